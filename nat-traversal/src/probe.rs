//! Authenticated path probes, sent on the WireGuard UDP socket.
//!
//! Both sites probe every candidate address of the other with a *ping*; the
//! peer answers with a *pong* that echoes the ping's transaction id and tells
//! the sender the source address the ping arrived from (its reflexive address
//! toward that peer). A probe proves that it comes from the peer: it carries a
//! 16-byte keyed BLAKE2s MAC whose key is derived from the static-static
//! X25519 Diffie-Hellman of the two sites' WireGuard keys, so there is nothing
//! new to configure or exchange.
//!
//! Wire format (all integers big-endian):
//!
//! ```text
//!  0        4    5                     37           49                  49+n    49+n+16
//!  +--------+----+---------------------+------------+-------------------+-------+
//!  | magic  |kind| sender public key   | tx id      | counter (ping: 8) | MAC   |
//!  | CA 63  | 1  | 32 bytes            | 12 bytes   | observed (pong):  | 16    |
//!  | 77 02  |2|3 |                     |            | port(2) + IPv4(4) |       |
//!  |        |    |                     |            |  or IPv6(16)      |       |
//!  +--------+----+---------------------+------------+-------------------+-------+
//!  kind 1 = ping (73 bytes), 2 = pong with IPv4 (71 bytes), 3 = pong with IPv6 (83 bytes)
//! ```
//!
//! A ping's *counter* is the sender's [`PingClock`]: microseconds of its
//! wall clock at start plus its monotonic clock since, strictly increasing.
//! It sits under the MAC, so the receiver's [`ReplayWindow`] can refuse a
//! ping it has seen, or one older than [`REPLAY_WINDOW`] before the newest
//! (however many pings came in between), without synchronised clocks.
//! Pongs need none: one counts only while its ping is in flight, once.
//!
//! The first byte, 0xCA, has its top bit set: a probe is never a WireGuard
//! message (first byte 1..=4, then three zero bytes) nor a STUN message (first
//! two bits zero). The MAC covers every byte before it, the sender key
//! included, so a probe reflected back to its sender fails ([`ProbeError::WrongSender`]).
//!
//! MAC key = BLAKE2s-256("causeway path probe v1" ‖ DH(own secret, peer public)
//! ‖ lower public key ‖ higher public key), the two public keys ordered
//! bytewise so both sites derive the same key; MAC = BLAKE2s keyed with it,
//! 16-byte output. Verification is constant-time.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use blake2::digest::consts::U16;
use blake2::digest::{Digest, KeyInit, Mac};
use blake2::{Blake2s256, Blake2sMac};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::stun::TransactionId;

/// The first four bytes of every probe (version 2: pings carry a counter).
pub const MAGIC: [u8; 4] = [0xCA, b'c', b'w', 0x02];

/// Length of a ping.
pub const PING_LEN: usize = BODY_START + 8 + MAC_LEN;
/// Length of a pong carrying an IPv4 address.
pub const PONG_V4_LEN: usize = BODY_START + 6 + MAC_LEN;
/// Length of a pong carrying an IPv6 address.
pub const PONG_V6_LEN: usize = BODY_START + 18 + MAC_LEN;
/// Largest probe; an output buffer of this size fits any probe.
pub const MAX_PROBE_LEN: usize = PONG_V6_LEN;

const KIND_PING: u8 = 1;
const KIND_PONG_V4: u8 = 2;
const KIND_PONG_V6: u8 = 3;
const SENDER_START: usize = 5;
const TX_START: usize = SENDER_START + 32;
const BODY_START: usize = TX_START + 12;
const MAC_LEN: usize = 16;
const KEY_LABEL: &[u8] = b"causeway path probe v1";

/// The key that authenticates probes between this site and one peer.
///
/// Holds both public keys: probes are encoded with the own key as sender and
/// [`open`] accepts only probes whose sender is the peer.
#[derive(Clone)]
pub struct ProbeKey {
    mac_key: [u8; 32],
    own_public: [u8; 32],
    peer_public: [u8; 32],
}

impl Drop for ProbeKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.mac_key);
    }
}

impl zeroize::ZeroizeOnDrop for ProbeKey {}

impl std::fmt::Debug for ProbeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeKey").finish_non_exhaustive()
    }
}

impl ProbeKey {
    /// Derives the probe key shared with `peer_public` from this site's
    /// WireGuard private key. Both sites derive the same key.
    ///
    /// Fails if `peer_public` is a low-order point (the shared secret would be
    /// known to everyone).
    pub fn derive(own_secret: &StaticSecret, peer_public: &PublicKey) -> Result<Self, ProbeError> {
        let own_public = PublicKey::from(own_secret);
        let shared = own_secret.diffie_hellman(peer_public);
        if !shared.was_contributory() {
            return Err(ProbeError::WeakPeerKey);
        }
        let (lo, hi) = if own_public.as_bytes() <= peer_public.as_bytes() {
            (own_public.as_bytes(), peer_public.as_bytes())
        } else {
            (peer_public.as_bytes(), own_public.as_bytes())
        };
        let mut h = Blake2s256::new();
        Digest::update(&mut h, KEY_LABEL);
        Digest::update(&mut h, shared.as_bytes());
        Digest::update(&mut h, lo);
        Digest::update(&mut h, hi);
        Ok(Self {
            mac_key: h.finalize().into(),
            own_public: own_public.to_bytes(),
            peer_public: peer_public.to_bytes(),
        })
    }

    /// This site's public key (the sender of the probes it encodes).
    pub fn own_public(&self) -> &[u8; 32] {
        &self.own_public
    }

    /// The peer's public key (the only sender [`open`] accepts).
    pub fn peer_public(&self) -> &[u8; 32] {
        &self.peer_public
    }

    fn mac(&self, data: &[u8]) -> Blake2sMac<U16> {
        let mut mac = <Blake2sMac<U16> as KeyInit>::new(&self.mac_key.into());
        Mac::update(&mut mac, data);
        mac
    }
}

/// The content of a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// "Can you hear me on this address?"
    Ping {
        /// Random transaction id, echoed in the pong.
        tx: TransactionId,
        /// The sender's [`PingClock`] when it sent the ping. The path
        /// machine leaves it 0; the driver stamps it before encoding.
        counter: u64,
    },
    /// The answer to a ping.
    Pong {
        /// The ping's transaction id.
        tx: TransactionId,
        /// The source address the ping arrived from, as the peer saw it.
        observed: SocketAddr,
    },
}

impl Probe {
    /// The transaction id.
    pub fn tx(&self) -> TransactionId {
        match *self {
            Probe::Ping { tx, .. } | Probe::Pong { tx, .. } => tx,
        }
    }
}

/// Why a datagram is not an acceptable probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// Not a probe: wrong magic, kind or length.
    #[error("not a path probe")]
    NotProbe,
    /// The probe names a sender other than the peer this key belongs to
    /// (e.g. our own probe reflected back).
    #[error("path probe from an unexpected sender")]
    WrongSender,
    /// The MAC does not verify: not from the peer, or altered on the way.
    #[error("path probe fails authentication")]
    BadMac,
    /// The peer's public key is a low-order point; no probe key can be derived.
    #[error("peer public key is a low-order point")]
    WeakPeerKey,
}

/// Encodes a ping into `out` and returns its length, [`PING_LEN`].
///
/// # Panics
/// If `out` is shorter than [`PING_LEN`].
pub fn encode_ping(key: &ProbeKey, tx: &TransactionId, counter: u64, out: &mut [u8]) -> usize {
    encode(key, &Probe::Ping { tx: *tx, counter }, out)
}

/// Encodes a pong answering the ping `tx` that arrived from `observed`, and
/// returns its length ([`PONG_V4_LEN`] or [`PONG_V6_LEN`]).
///
/// # Panics
/// If `out` is shorter than [`MAX_PROBE_LEN`] (or the actual length).
pub fn encode_pong(
    key: &ProbeKey,
    tx: &TransactionId,
    observed: SocketAddr,
    out: &mut [u8],
) -> usize {
    encode(key, &Probe::Pong { tx: *tx, observed }, out)
}

/// Encodes any probe and returns its length.
///
/// # Panics
/// If `out` is shorter than the probe ([`MAX_PROBE_LEN`] always fits).
pub fn encode(key: &ProbeKey, probe: &Probe, out: &mut [u8]) -> usize {
    out[..4].copy_from_slice(&MAGIC);
    out[SENDER_START..TX_START].copy_from_slice(&key.own_public);
    out[TX_START..BODY_START].copy_from_slice(&probe.tx().0);
    let body_end = match *probe {
        Probe::Ping { counter, .. } => {
            out[4] = KIND_PING;
            out[BODY_START..BODY_START + 8].copy_from_slice(&counter.to_be_bytes());
            BODY_START + 8
        }
        Probe::Pong { observed, .. } => {
            out[BODY_START..BODY_START + 2].copy_from_slice(&observed.port().to_be_bytes());
            match observed.ip() {
                IpAddr::V4(ip) => {
                    out[4] = KIND_PONG_V4;
                    out[BODY_START + 2..BODY_START + 6].copy_from_slice(&ip.octets());
                    BODY_START + 6
                }
                IpAddr::V6(ip) => {
                    out[4] = KIND_PONG_V6;
                    out[BODY_START + 2..BODY_START + 18].copy_from_slice(&ip.octets());
                    BODY_START + 18
                }
            }
        }
    };
    let tag = key.mac(&out[..body_end]).finalize().into_bytes();
    out[body_end..body_end + MAC_LEN].copy_from_slice(&tag);
    body_end + MAC_LEN
}

/// Whether `datagram` has the shape of a probe (magic, kind and a matching
/// length). Says nothing about its authenticity.
pub fn is_probe(datagram: &[u8]) -> bool {
    expected_len(datagram).is_some_and(|len| len == datagram.len())
}

fn expected_len(datagram: &[u8]) -> Option<usize> {
    if datagram.get(..4)? != MAGIC {
        return None;
    }
    match *datagram.get(4)? {
        KIND_PING => Some(PING_LEN),
        KIND_PONG_V4 => Some(PONG_V4_LEN),
        KIND_PONG_V6 => Some(PONG_V6_LEN),
        _ => None,
    }
}

/// The sender public key of a probe, *unauthenticated*: use it only to find
/// the peer (and its [`ProbeKey`]), then [`open`] the probe with that key.
pub fn sender(datagram: &[u8]) -> Option<[u8; 32]> {
    if !is_probe(datagram) {
        return None;
    }
    datagram.get(SENDER_START..TX_START)?.try_into().ok()
}

/// Verifies a probe from the peer of `key` and decodes it. Never panics.
pub fn open(key: &ProbeKey, datagram: &[u8]) -> Result<Probe, ProbeError> {
    if !is_probe(datagram) {
        return Err(ProbeError::NotProbe);
    }
    let body_end = datagram.len() - MAC_LEN;
    if datagram[SENDER_START..TX_START] != key.peer_public {
        return Err(ProbeError::WrongSender);
    }
    key.mac(&datagram[..body_end])
        .verify_slice(&datagram[body_end..])
        .map_err(|_| ProbeError::BadMac)?;
    let mut tx = [0u8; 12];
    tx.copy_from_slice(&datagram[TX_START..BODY_START]);
    let tx = TransactionId(tx);
    let body = &datagram[BODY_START..body_end];
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    Ok(match datagram[4] {
        KIND_PONG_V4 => {
            let ip = Ipv4Addr::new(body[2], body[3], body[4], body[5]);
            Probe::Pong {
                tx,
                observed: SocketAddr::new(ip.into(), port(body)),
            }
        }
        KIND_PONG_V6 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&body[2..18]);
            Probe::Pong {
                tx,
                observed: SocketAddr::new(Ipv6Addr::from(octets).into(), port(body)),
            }
        }
        _ => {
            let mut counter = [0u8; 8];
            counter.copy_from_slice(&body[..8]);
            Probe::Ping {
                tx,
                counter: u64::from_be_bytes(counter),
            }
        }
    })
}

/// How far (in counter microseconds) a ping may trail the newest one seen
/// from the same peer and still be accepted (reordering, pings to several
/// candidates in flight together).
pub const REPLAY_WINDOW: u64 = 10_000_000;
/// Ping counters remembered inside the window.
const REPLAY_SEEN: usize = 64;

/// A site's ping counter: its wall clock at start (microseconds since the
/// Unix epoch) advanced by the monotonic clock, strictly increasing. A
/// restarted site starts above what it sent before as long as its wall
/// clock did not go back; no state is kept across restarts.
#[derive(Clone, Copy, Debug)]
pub struct PingClock {
    base: std::time::Instant,
    base_micros: u64,
    last: u64,
}

impl PingClock {
    /// A clock that reads `wall` at `now` (the only wall-clock reading).
    pub fn new(now: std::time::Instant, wall: std::time::SystemTime) -> Self {
        let base_micros = wall
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        Self {
            base: now,
            base_micros,
            last: 0,
        }
    }

    /// The counter for a ping sent at `now`: greater than every earlier one.
    pub fn next(&mut self, now: std::time::Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.base).as_micros();
        let t = self
            .base_micros
            .saturating_add(u64::try_from(elapsed).unwrap_or(u64::MAX));
        self.last = t.max(self.last.saturating_add(1));
        self.last
    }
}

/// The receiving side of [`PingClock`], one per peer: accepts each ping
/// counter once, and none more than [`REPLAY_WINDOW`] below the newest, or
/// below the oldest one it had to forget to make room. A ping recorded
/// long ago and replayed is refused however many pings came since.
#[derive(Clone, Debug, Default)]
pub struct ReplayWindow {
    seen: Vec<u64>,
    highest: u64,
    floor: u64,
}

impl ReplayWindow {
    /// Whether a ping with `counter` is new; if so, remembers it.
    pub fn accept(&mut self, counter: u64) -> bool {
        if counter <= self.floor
            || counter.saturating_add(REPLAY_WINDOW) <= self.highest
            || self.seen.contains(&counter)
        {
            return false;
        }
        // Forget what fell out of the window, then the oldest if still full.
        let low = self.highest.max(counter).saturating_sub(REPLAY_WINDOW);
        self.seen.retain(|&c| c > low);
        if self.seen.len() >= REPLAY_SEEN
            && let Some((i, &oldest)) = self.seen.iter().enumerate().min_by_key(|(_, c)| **c)
        {
            self.floor = self.floor.max(oldest);
            self.seen.swap_remove(i);
        }
        if counter <= self.floor {
            return false;
        }
        self.seen.push(counter);
        self.highest = self.highest.max(counter);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stun;

    #[test]
    fn probe_key_is_zeroized_on_drop() {
        fn zeroized_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        zeroized_on_drop::<ProbeKey>();
    }

    fn keys(a: u8, b: u8) -> (ProbeKey, ProbeKey) {
        let sa = StaticSecret::from([a; 32]);
        let sb = StaticSecret::from([b; 32]);
        let ka = ProbeKey::derive(&sa, &PublicKey::from(&sb)).unwrap();
        let kb = ProbeKey::derive(&sb, &PublicKey::from(&sa)).unwrap();
        (ka, kb)
    }

    #[test]
    fn both_sites_derive_the_same_key() {
        let (ka, kb) = keys(1, 2);
        assert_eq!(ka.mac_key, kb.mac_key);
        let (kc, _) = keys(1, 3);
        assert_ne!(ka.mac_key, kc.mac_key);
    }

    #[test]
    fn roundtrip() {
        let (ka, kb) = keys(1, 2);
        let tx = TransactionId([5; 12]);
        let mut buf = [0u8; MAX_PROBE_LEN];
        let n = encode_ping(&ka, &tx, 0x0102_0304_0506_0708, &mut buf);
        assert_eq!(n, PING_LEN);
        assert!(is_probe(&buf[..n]));
        assert_eq!(sender(&buf[..n]), Some(*ka.own_public()));
        assert_eq!(
            open(&kb, &buf[..n]),
            Ok(Probe::Ping {
                tx,
                counter: 0x0102_0304_0506_0708
            })
        );
        for (observed, len) in [
            ("198.51.100.7:4500", PONG_V4_LEN),
            ("[2001:db8::1]:51820", PONG_V6_LEN),
        ] {
            let observed: SocketAddr = observed.parse().unwrap();
            let n = encode_pong(&kb, &tx, observed, &mut buf);
            assert_eq!(n, len);
            assert_eq!(open(&ka, &buf[..n]), Ok(Probe::Pong { tx, observed }));
        }
    }

    #[test]
    fn forgeries_are_rejected() {
        let (ka, kb) = keys(1, 2);
        let mut buf = [0u8; MAX_PROBE_LEN];
        let n = encode_pong(
            &ka,
            &TransactionId([5; 12]),
            "192.0.2.1:1".parse().unwrap(),
            &mut buf,
        );
        // Any flipped bit after the kind byte breaks it.
        for i in 5..n {
            let mut copy = buf;
            copy[i] ^= 0x01;
            let err = open(&kb, &copy[..n]).unwrap_err();
            assert!(
                matches!(err, ProbeError::BadMac | ProbeError::WrongSender),
                "byte {i}: {err:?}"
            );
        }
        // Reflected to its sender.
        assert_eq!(open(&ka, &buf[..n]), Err(ProbeError::WrongSender));
        // A third site (with the right sender field but another key) cannot forge.
        let (kc, _) = keys(3, 2);
        let mut forged = [0u8; MAX_PROBE_LEN];
        let m = encode_ping(&kc, &TransactionId([5; 12]), 1, &mut forged);
        forged[SENDER_START..TX_START].copy_from_slice(ka.own_public());
        assert_eq!(open(&kb, &forged[..m]), Err(ProbeError::BadMac));
        // Truncated or extended.
        assert_eq!(open(&kb, &buf[..n - 1]), Err(ProbeError::NotProbe));
        assert_eq!(open(&kb, &buf[..n + 1]), Err(ProbeError::NotProbe));
    }

    #[test]
    fn low_order_peer_key_is_refused() {
        let s = StaticSecret::from([1; 32]);
        assert_eq!(
            ProbeKey::derive(&s, &PublicKey::from([0; 32])).unwrap_err(),
            ProbeError::WeakPeerKey
        );
    }

    #[test]
    fn demultiplexing() {
        let (ka, _) = keys(1, 2);
        let mut buf = [0u8; MAX_PROBE_LEN];
        for n in [
            encode_ping(&ka, &TransactionId([0; 12]), 0, &mut buf),
            encode_pong(
                &ka,
                &TransactionId([0; 12]),
                "[::]:0".parse().unwrap(),
                &mut buf,
            ),
        ] {
            assert!(!stun::is_stun(&buf[..n]));
            assert!(buf[0] >= 0x80, "never a WireGuard message type");
        }
        // WireGuard messages are never probes.
        for ty in 1u8..=4 {
            for len in [32usize, 64, 65, 71, 73, 83, 92, 148] {
                let mut msg = vec![0u8; len];
                msg[0] = ty;
                assert!(!is_probe(&msg));
            }
        }
        // STUN messages are never probes.
        let mut stun_buf = [0u8; stun::MAX_ENCODED_LEN];
        let n = stun::encode_binding_request(&TransactionId([0; 12]), &mut stun_buf);
        assert!(!is_probe(&stun_buf[..n]));
    }

    #[test]
    fn ping_clock_counts_up_and_survives_a_restart() {
        let t0 = std::time::Instant::now();
        let wall = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let mut clock = PingClock::new(t0, wall);
        let a = clock.next(t0);
        let b = clock.next(t0);
        let c = clock.next(t0 + std::time::Duration::from_secs(1));
        assert!(a < b && b < c);
        assert_eq!(a, 1_700_000_000_000_000);
        // Restarted a minute later: above everything sent before.
        let mut restarted = PingClock::new(
            t0 + std::time::Duration::from_secs(60),
            wall + std::time::Duration::from_secs(60),
        );
        assert!(restarted.next(t0 + std::time::Duration::from_secs(60)) > c);
    }

    #[test]
    fn replays_are_refused_however_old() {
        let mut w = ReplayWindow::default();
        let base = 1_700_000_000_000_000u64;
        assert!(w.accept(base));
        assert!(!w.accept(base), "the same ping twice");
        // Reordered within the window: accepted once.
        assert!(w.accept(base + 500_000));
        assert!(w.accept(base + 200_000));
        assert!(!w.accept(base + 200_000));
        // Far more pings than remembered, all within the window: the
        // oldest forgotten ones raise the floor, so no earlier ping (seen
        // or not) gets in again.
        for i in 1..=200u64 {
            assert!(w.accept(base + 1_000_000 + i * 1000));
        }
        assert!(!w.accept(base));
        assert!(!w.accept(base + 1_000_000 + 1000));
        assert!(!w.accept(base + 300_000), "never seen, but below the floor");
        // Older than the window before the newest: refused.
        assert!(w.accept(base + 60_000_000));
        assert!(!w.accept(base + 60_000_000 - REPLAY_WINDOW));
        assert!(w.accept(base + 60_000_000 - REPLAY_WINDOW + 1));
    }

    proptest::proptest! {
        #[test]
        fn open_never_panics(
            data in proptest::collection::vec(proptest::num::u8::ANY, 0..100),
            kind in 0u8..5,
        ) {
            let (ka, _) = keys(1, 2);
            let mut data = data;
            if data.len() > 5 {
                data[..4].copy_from_slice(&MAGIC);
                data[4] = kind;
            }
            let _ = open(&ka, &data);
            let _ = sender(&data);
        }
    }
}
