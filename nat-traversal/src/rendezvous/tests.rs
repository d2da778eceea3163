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
    assert!(matches!(err, ConnectError::BadProof { .. }), "{err:?}");
    let closed = timeout(WAIT, relay_task).await.unwrap().unwrap();
    match closed {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(
                c.error_code.into_inner(),
                u64::from(super::CloseCode::BadProof.as_u32())
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
