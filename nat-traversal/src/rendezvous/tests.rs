//! Attacks that need the protocol's insides: a man in the middle, an
//! impostor rendezvous, and a site relaying to a site that did not list it.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::timeout;
use x25519_dalek::{PublicKey, StaticSecret};

use super::auth::{self, AuthKey, Role};
use super::proto::{FrameDecoder, RendezvousMessage, SiteMessage, Wire32};
use super::stream::{read_frame, write_frame};
use super::tls::{self, SERVER_NAME};
use super::{ConnectError, RendezvousClient, RendezvousEvent, RendezvousServer, SiteEntry};

const WAIT: Duration = Duration::from_secs(5);

fn keypair() -> (StaticSecret, PublicKey) {
    let secret = causeway_common::keys::generate();
    let public = PublicKey::from(&secret);
    (secret, public)
}

fn server_endpoint() -> quinn::Endpoint {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(tls::server_config().unwrap()),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .unwrap()
}

struct Running {
    addr: SocketAddr,
    public: PublicKey,
    stats: super::ServerStats,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

fn start(sites: &[(&str, PublicKey)]) -> Running {
    let (secret, _) = keypair();
    let entries: Vec<SiteEntry> = sites
        .iter()
        .map(|(name, key)| SiteEntry {
            name: (*name).into(),
            public_key: *key,
        })
        .collect();
    let server = RendezvousServer::with_sockets(
        secret,
        &entries,
        UdpSocket::bind("127.0.0.1:0").unwrap(),
        None,
    );
    let addr = server.quic_addr().unwrap();
    let public = server.public_key();
    let stats = server.stats();
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        server
            .run(async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    Running {
        addr,
        public,
        stats,
        stop,
        task,
    }
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        timeout(WAIT, self.task).await.unwrap().unwrap();
    }
}

/// Copies a QUIC stream one way until it ends.
async fn pipe(mut from: quinn::RecvStream, mut to: quinn::SendStream) {
    while let Ok(Some(chunk)) = from.read_chunk(64 * 1024, true).await {
        if to.write_all(&chunk.bytes).await.is_err() {
            return;
        }
    }
    let _ = to.finish();
}

/// A man in the middle: it terminates the site's QUIC/TLS connection (the
/// site accepts any certificate) and dials the real rendezvous, forwarding
/// the control stream verbatim both ways. The site's proof is bound to the
/// site↔MITM session, so the rendezvous (on the MITM↔rendezvous session)
/// must refuse it.
#[tokio::test]
async fn man_in_the_middle_cannot_forward_proofs() {
    let (site_secret, site_public) = keypair();
    let real = start(&[("a", site_public)]);
    let mitm = server_endpoint();
    let mitm_addr = mitm.local_addr().unwrap();
    let upstream = real.addr;
    let relay_task = tokio::spawn(async move {
        let down = mitm.accept().await.unwrap().await.unwrap();
        let (dsend, drecv) = down.accept_bi().await.unwrap();
        let up_ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let up = up_ep
            .connect_with(tls::client_config().unwrap(), upstream, SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        let (usend, urecv) = up.open_bi().await.unwrap();
        tokio::join!(pipe(drecv, usend), pipe(urecv, dsend));
        // What the rendezvous said to the MITM's session.
        up.closed().await
    });

    // The site believes it talks to the real rendezvous (right pinned key).
    let err = RendezvousClient::connect(mitm_addr, real.public, site_secret, vec![])
        .await
        .err()
        .expect("the MITM must not get through");
    // A bad proof is answered like an unknown key (no key oracle).
    assert!(
        matches!(err, ConnectError::UnknownSiteKey { .. }),
        "{err:?}"
    );
    let closed = timeout(WAIT, relay_task).await.unwrap().unwrap();
    match closed {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(
                c.error_code.into_inner(),
                u64::from(super::CloseCode::UnknownSiteKey.as_u32())
            );
        }
        e => panic!("{e:?}"),
    }
    assert!(!real.stats.site("a").unwrap().connected);
    real.stop().await;
}

/// A rendezvous impostor answers `Welcome` with a proof it cannot make
/// right: its own key's, or the real key's for another session.
#[tokio::test]
async fn site_refuses_a_rendezvous_that_cannot_prove_the_pinned_key() {
    let (site_secret, site_public) = keypair();
    let (real_secret, real_public) = keypair();
    let (impostor_secret, _) = keypair();
    for case in ["impostor key", "proof for another session"] {
        let ep = server_endpoint();
        let addr = ep.local_addr().unwrap();
        let (impostor_secret, real_secret) = (impostor_secret.clone(), real_secret.clone());
        let fake = tokio::spawn(async move {
            let conn = ep.accept().await.unwrap().await.unwrap();
            let (mut send, mut recv) = conn.accept_bi().await.unwrap();
            let mut dec = FrameDecoder::default();
            let hello: SiteMessage = read_frame(&mut recv, &mut dec)
                .await
                .ok()
                .flatten()
                .unwrap();
            let SiteMessage::Hello { .. } = hello else {
                panic!("{hello:?}")
            };
            let mut exporter = [0u8; 32];
            conn.export_keying_material(
                &mut exporter,
                auth::EXPORTER_LABEL,
                auth::EXPORTER_CONTEXT,
            )
            .unwrap();
            let proof = if case == "impostor key" {
                AuthKey::derive(&impostor_secret, &site_public)
                    .unwrap()
                    .proof(Role::Rendezvous, &exporter, &site_public, &real_public)
            } else {
                let mut other = exporter;
                other[0] ^= 1;
                AuthKey::derive(&real_secret, &site_public).unwrap().proof(
                    Role::Rendezvous,
                    &other,
                    &site_public,
                    &real_public,
                )
            };
            let welcome = RendezvousMessage::Welcome {
                proof: Wire32(proof),
                relay_id: 1,
                observed: conn.remote_address(),
            };
            write_frame(&mut send, &welcome).await.unwrap();
            // The site must not register (reveal its peers) with an impostor.
            let next: Option<SiteMessage> = read_frame(&mut recv, &mut dec).await.ok().flatten();
            (next, conn.closed().await)
        });
        let (_, peer) = keypair();
        let err = RendezvousClient::connect(addr, real_public, site_secret.clone(), vec![peer])
            .await
            .err()
            .expect("refused");
        assert!(
            matches!(err, ConnectError::WrongRendezvousKey { .. }),
            "{case}: {err:?}"
        );
        let (next, closed) = timeout(WAIT, fake).await.unwrap().unwrap();
        assert_eq!(
            next, None,
            "{case}: the site sent something after a bad welcome"
        );
        match closed {
            quinn::ConnectionError::ApplicationClosed(c) => assert_eq!(
                c.error_code.into_inner(),
                u64::from(super::CloseCode::WrongRendezvousKey.as_u32())
            ),
            e => panic!("{case}: {e:?}"),
        }
    }
}

/// C lists A, A does not list C. Even if C learns A's relay id (it never
/// does from the rendezvous), the rendezvous drops what C sends to it.
#[tokio::test]
async fn relay_refuses_unauthorized_pairs() {
    let (sa, pa) = keypair();
    let (sb, pb) = keypair();
    let (sc, pc) = keypair();
    let server = start(&[("a", pa), ("b", pb), ("c", pc)]);
    let mut a = RendezvousClient::connect(server.addr, server.public, sa, vec![pb])
        .await
        .unwrap();
    let mut b = RendezvousClient::connect(server.addr, server.public, sb, vec![pa])
        .await
        .unwrap();
    let c = RendezvousClient::connect(server.addr, server.public, sc, vec![pa])
        .await
        .unwrap();
    for client in [&mut a, &mut b] {
        loop {
            match timeout(WAIT, client.next_event()).await.unwrap().unwrap() {
                RendezvousEvent::PeerUpdate { online: true, .. } => break,
                RendezvousEvent::Connected { .. } => continue,
                e => panic!("{e:?}"),
            }
        }
    }
    // Steal A's relay id from B's client and give it to C.
    let a_relay_id = b.handle().relay_id_of(&pa).unwrap();
    c.handle().force_relay_id(&pa, a_relay_id);
    for _ in 0..20 {
        c.send_relay(&pa, &[0x55; 1452]).unwrap();
        c.send_relay(&pa, &[0x55; 60]).unwrap();
    }
    // Also a relay id that belongs to nobody.
    c.handle()
        .force_relay_id(&pb, a_relay_id.wrapping_add(1000));
    c.send_relay(&pb, &[1; 100]).unwrap();
    // B's packets to A still pass.
    b.send_relay(&pa, &[7; 100]).unwrap();
    let got = timeout(WAIT, async {
        loop {
            if let Some(RendezvousEvent::Relayed { from, packet }) = a.next_event().await {
                return (from, packet);
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(got, (pb, vec![7; 100]));
    // Nothing from C ever reaches A.
    let more = timeout(Duration::from_millis(300), a.next_event()).await;
    assert!(more.is_err(), "{more:?}");
    let stats = server.stats.site("c").unwrap();
    assert_eq!(stats.relay_rx_packets, 0);
    assert_eq!(stats.relay_rx_bytes, 0);
    assert!(stats.relay_dropped >= 41, "{stats:?}");
    assert_eq!(a.handle().stats().relay_rx_packets, 1);
    drop((a, b, c));
    server.stop().await;
}

/// A raw QUIC connection to the rendezvous with its control stream open.
async fn raw_connection(
    addr: SocketAddr,
) -> (
    quinn::Endpoint,
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
) {
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = ep
        .connect_with(tls::client_config().unwrap(), addr, SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let (send, recv) = conn.open_bi().await.unwrap();
    (ep, conn, send, recv)
}

/// Sends a hello for `site` with the proof `prove` makes from the
/// session's exporter; returns how the rendezvous closed the connection,
/// or the live connection if it answered `Welcome`.
async fn hello(
    server: &Running,
    site: &PublicKey,
    prove: impl Fn(&auth::Exporter) -> [u8; 32],
) -> Result<
    (
        quinn::Endpoint,
        quinn::Connection,
        quinn::SendStream,
        quinn::RecvStream,
    ),
    (u64, Vec<u8>),
> {
    let (ep, conn, mut send, mut recv) = raw_connection(server.addr).await;
    let mut exporter = [0u8; 32];
    conn.export_keying_material(&mut exporter, auth::EXPORTER_LABEL, auth::EXPORTER_CONTEXT)
        .unwrap();
    let hello = SiteMessage::Hello {
        version: super::proto::PROTOCOL_VERSION,
        site_key: Wire32(site.to_bytes()),
        rendezvous_key: Wire32(server.public.to_bytes()),
        proof: Wire32(prove(&exporter)),
    };
    write_frame(&mut send, &hello).await.unwrap();
    let mut dec = FrameDecoder::default();
    match timeout(WAIT, read_frame::<RendezvousMessage>(&mut recv, &mut dec))
        .await
        .unwrap()
    {
        Ok(Some(RendezvousMessage::Welcome { .. })) => Ok((ep, conn, send, recv)),
        _ => match timeout(WAIT, conn.closed()).await.unwrap() {
            quinn::ConnectionError::ApplicationClosed(c) => {
                Err((c.error_code.into_inner(), c.reason.to_vec()))
            }
            e => panic!("{e:?}"),
        },
    }
}

/// The rendezvous must not tell "this key is not served here" from "this
/// proof is wrong": otherwise anyone can ask it which keys it serves.
#[tokio::test]
async fn unknown_key_and_bad_proof_are_answered_alike() {
    let (_, served) = keypair();
    let (_, stranger) = keypair();
    let server = start(&[("a", served)]);
    let bad_proof = hello(&server, &served, |_| [7; 32]).await.err().unwrap();
    let unknown = hello(&server, &stranger, |_| [7; 32]).await.err().unwrap();
    assert_eq!(bad_proof, unknown);
    assert_eq!(
        bad_proof.0,
        u64::from(super::CloseCode::UnknownSiteKey.as_u32())
    );
    assert_eq!(server.stats.abuse().auth_failures, 2);
    server.stop().await;
}

/// A valid site floods registrations, each with new candidates: its peer
/// hears a few (the burst, then one per interval), the latest last, and the
/// rendezvous keeps at most 16 candidates and only configured peers.
#[tokio::test]
async fn a_registration_flood_is_coalesced_and_bounded() {
    let (sa, pa) = keypair();
    let (sb, pb) = keypair();
    let server = start(&[("a", pa), ("b", pb)]);
    let mut b = RendezvousClient::connect(server.addr, server.public, sb, vec![pa])
        .await
        .unwrap();
    let key = AuthKey::derive(&sa, &server.public).unwrap();
    let (_ep, _conn, mut send, _recv) = hello(&server, &pa, |exporter| {
        key.proof(Role::Site, exporter, &pa, &server.public)
    })
    .await
    .unwrap();
    const FLOOD: u16 = 2000;
    let candidates = |port: u16| -> Vec<SocketAddr> {
        (0..40)
            .map(|i| SocketAddr::from(([192, 0, 2, i], port)))
            .collect()
    };
    let strangers: Vec<Wire32> = (0..100u8).map(|i| Wire32([i; 32])).collect();
    for port in 1..=FLOOD {
        let mut peers = strangers.clone();
        peers.push(Wire32(pb.to_bytes()));
        let register = SiteMessage::Register {
            peers,
            candidates: candidates(port),
        };
        write_frame(&mut send, &register).await.unwrap();
    }
    let mut heard = 0;
    let last = timeout(WAIT, async {
        loop {
            match b.next_event().await.unwrap() {
                RendezvousEvent::PeerUpdate {
                    peer, candidates, ..
                } => {
                    assert_eq!(peer, pa);
                    heard += 1;
                    if candidates.first().map(SocketAddr::port) == Some(FLOOD) {
                        return candidates;
                    }
                }
                RendezvousEvent::Connected { .. } => {}
                e => panic!("{e:?}"),
            }
        }
    })
    .await
    .expect("the latest registration reaches the peer");
    assert_eq!(last, candidates(FLOOD)[..16].to_vec());
    // The burst, and one per interval of the few seconds at most the flood
    // took to arrive; nowhere near one per registration.
    assert!(
        heard <= 40,
        "the peer heard {heard} of {FLOOD} registrations"
    );
    let abuse = server.stats.abuse();
    assert!(
        abuse.registrations_coalesced >= u64::from(FLOOD) - 40,
        "{abuse:?}"
    );
    assert!(abuse.registration_entries_dropped >= 100 + 24, "{abuse:?}");
    drop(b);
    server.stop().await;
}
