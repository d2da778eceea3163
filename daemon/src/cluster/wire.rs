//! The cluster protocol's wire format, without I/O: frames, the
//! announcement, and the session keys both ends derive from the shared
//! cluster secret.
//!
//! ```text
//! gateway → node   frame: "CWC1" ‖ server nonce (16 bytes)            (clear)
//! node → gateway   frame: client nonce (16) ‖ seal(watch)             (first)
//!                  frame: seal(watch)                                  (later)
//! gateway → node   frame: seal(reply)
//! watch  = version (u64 BE): the version the node has (0: none)
//! reply  = version (u64 BE) ‖ announcement (JSON)
//! frame  = length (u32 BE, ≤ MAX_FRAME) ‖ payload
//! ```
//!
//! Each direction has its own key, `BLAKE2s-MAC(secret, label ‖ server
//! nonce ‖ client nonce)`, and seals with ChaCha20-Poly1305 under a counter
//! nonce that starts at 0 and goes up by one per frame. So only a holder of
//! the secret can read an announcement or make the gateway answer (the
//! first watch must open under a key bound to the gateway's fresh nonce),
//! and a recorded frame is refused on any other connection, or out of
//! order on its own.

use std::net::IpAddr;

use blake2::Blake2sMac256;
use blake2::digest::Mac as _;
use chacha20poly1305::aead::{Aead as _, KeyInit as _};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// The first bytes of the gateway's hello: protocol and version.
pub const MAGIC: [u8; 4] = *b"CWC1";
/// Length of each side's nonce.
pub const NONCE_LEN: usize = 16;
/// The largest frame payload either side accepts.
pub const MAX_FRAME: usize = 64 * 1024;
/// The AEAD tag length.
const TAG_LEN: usize = 16;

/// What a gateway tells the node agents: which site, whether it is the
/// active gateway, and what nodes must route to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    /// The site's name.
    pub site: String,
    /// Whether this gateway is the active one (carries the site's traffic).
    pub active: bool,
    /// The activation counter: when two gateways both say they are active,
    /// nodes follow the higher term (then the lower address).
    pub term: u64,
    /// The site's own pod CIDRs (for host source NAT and the masquerade
    /// check).
    pub pod_cidrs: Vec<IpNet>,
    /// Every peer view CIDR: what nodes route to the gateway.
    pub views: Vec<IpNet>,
    /// The address nodes route to instead of the one they reached the
    /// gateway at (`[cluster] route_via`, e.g. a VIP).
    pub route_via: Option<IpAddr>,
    /// The gateway's VXLAN network identifier.
    pub vxlan_vni: u32,
    /// The gateway's VXLAN UDP port.
    pub vxlan_port: u16,
}

/// What is wrong with a frame; each is counted and the connection closed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// A frame longer than [`MAX_FRAME`].
    #[error("frame of {0} bytes is longer than the limit of {MAX_FRAME}")]
    TooLong(usize),
    /// The hello does not start with [`MAGIC`] or has the wrong length.
    #[error("not a Causeway cluster hello (another protocol or version)")]
    BadHello,
    /// A frame too short for what it must hold.
    #[error("frame of {0} bytes is too short")]
    TooShort(usize),
    /// A sealed frame did not open: another secret, forged, replayed, or
    /// out of order.
    #[error("frame does not authenticate (another cluster secret, forged or replayed)")]
    Auth,
    /// The announcement in a reply is not valid JSON of the right shape.
    #[error("announcement does not parse: {0}")]
    Announcement(String),
}

/// The shared cluster secret, as a 32-byte MAC key: the BLAKE2s-256 hash of
/// the secret file's content, surrounding whitespace trimmed (so a Kubernetes
/// Secret with or without a trailing newline gives the same key).
#[derive(Clone)]
pub struct ClusterSecret(Zeroizing<[u8; 32]>);

impl ClusterSecret {
    /// The key of a secret file's content; `None` when it is shorter than 16
    /// bytes (too easy to guess).
    pub fn from_file_content(content: &[u8]) -> Option<Self> {
        let trimmed = content.trim_ascii();
        if trimmed.len() < crate::config::MIN_SECRET_LEN {
            return None;
        }
        use blake2::Digest as _;
        let hash = blake2::Blake2s256::digest(trimmed);
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(&hash);
        Some(Self(key))
    }

    fn derive(&self, label: &[u8], server: &[u8; NONCE_LEN], client: &[u8; NONCE_LEN]) -> Key {
        let key: &[u8; 32] = &self.0;
        let mut mac = <Blake2sMac256 as blake2::digest::KeyInit>::new(key.into());
        mac.update(label);
        mac.update(server);
        mac.update(client);
        let out = mac.finalize().into_bytes();
        *Key::from_slice(&out)
    }
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<cluster secret>")
    }
}

/// One direction's cipher and frame counter.
struct Direction {
    cipher: ChaCha20Poly1305,
    counter: u64,
}

impl Direction {
    fn new(key: &Key) -> Self {
        Self {
            cipher: ChaCha20Poly1305::new(key),
            counter: 0,
        }
    }

    fn nonce(&self) -> Nonce {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&self.counter.to_be_bytes());
        Nonce::from(nonce)
    }
}

/// One connection's keys, on either end.
pub struct Session {
    send: Direction,
    recv: Direction,
}

impl Session {
    /// The node's end, after the gateway's hello.
    pub fn client(
        secret: &ClusterSecret,
        server: &[u8; NONCE_LEN],
        client: &[u8; NONCE_LEN],
    ) -> Self {
        Self {
            send: Direction::new(&secret.derive(b"causeway cluster node->gateway", server, client)),
            recv: Direction::new(&secret.derive(b"causeway cluster gateway->node", server, client)),
        }
    }

    /// The gateway's end, after the node's first frame.
    pub fn server(
        secret: &ClusterSecret,
        server: &[u8; NONCE_LEN],
        client: &[u8; NONCE_LEN],
    ) -> Self {
        Self {
            send: Direction::new(&secret.derive(b"causeway cluster gateway->node", server, client)),
            recv: Direction::new(&secret.derive(b"causeway cluster node->gateway", server, client)),
        }
    }

    /// Seals the next frame's payload.
    pub fn seal(&mut self, plaintext: &[u8]) -> Vec<u8> {
        let nonce = self.send.nonce();
        self.send.counter += 1;
        // Encryption fails only for plaintexts longer than 256 GiB.
        self.send
            .cipher
            .encrypt(&nonce, plaintext)
            .unwrap_or_default()
    }

    /// Opens the next frame's payload; anything but the next frame of this
    /// connection, sealed with the same secret, is [`WireError::Auth`].
    pub fn open(&mut self, sealed: &[u8]) -> Result<Vec<u8>, WireError> {
        if sealed.len() < TAG_LEN {
            return Err(WireError::TooShort(sealed.len()));
        }
        let nonce = self.recv.nonce();
        let plain = self
            .recv
            .cipher
            .decrypt(&nonce, sealed)
            .map_err(|_| WireError::Auth)?;
        self.recv.counter += 1;
        Ok(plain)
    }
}

/// The gateway's hello.
pub fn hello(server_nonce: &[u8; NONCE_LEN]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(server_nonce);
    out
}

/// The server nonce from a hello.
pub fn parse_hello(frame: &[u8]) -> Result<[u8; NONCE_LEN], WireError> {
    match frame.split_first_chunk::<4>() {
        Some((magic, rest)) if *magic == MAGIC => {
            <[u8; NONCE_LEN]>::try_from(rest).map_err(|_| WireError::BadHello)
        }
        _ => Err(WireError::BadHello),
    }
}

/// The node's first frame: its nonce and its first sealed watch.
pub fn first_watch(client_nonce: &[u8; NONCE_LEN], session: &mut Session, version: u64) -> Vec<u8> {
    let mut out = client_nonce.to_vec();
    out.extend(session.seal(&version.to_be_bytes()));
    out
}

/// Splits the node's first frame into its nonce and the sealed watch.
pub fn split_first_watch(frame: &[u8]) -> Result<([u8; NONCE_LEN], &[u8]), WireError> {
    let (nonce, rest) = frame
        .split_first_chunk::<NONCE_LEN>()
        .ok_or(WireError::TooShort(frame.len()))?;
    Ok((*nonce, rest))
}

/// A sealed watch: the version the node has.
pub fn watch(session: &mut Session, version: u64) -> Vec<u8> {
    session.seal(&version.to_be_bytes())
}

/// Opens a sealed watch.
pub fn open_watch(session: &mut Session, sealed: &[u8]) -> Result<u64, WireError> {
    let plain = session.open(sealed)?;
    let bytes =
        <[u8; 8]>::try_from(plain.as_slice()).map_err(|_| WireError::TooShort(plain.len()))?;
    Ok(u64::from_be_bytes(bytes))
}

/// A sealed reply: the gateway's version and announcement.
pub fn reply(session: &mut Session, version: u64, announcement: &Announcement) -> Vec<u8> {
    let mut plain = version.to_be_bytes().to_vec();
    // Serializing plain data with string keys cannot fail.
    plain.extend(serde_json::to_vec(announcement).unwrap_or_default());
    session.seal(&plain)
}

/// Opens a sealed reply.
pub fn open_reply(session: &mut Session, sealed: &[u8]) -> Result<(u64, Announcement), WireError> {
    let plain = session.open(sealed)?;
    let (version, body) = plain
        .split_first_chunk::<8>()
        .ok_or(WireError::TooShort(plain.len()))?;
    let announcement =
        serde_json::from_slice(body).map_err(|e| WireError::Announcement(e.to_string()))?;
    Ok((u64::from_be_bytes(*version), announcement))
}

/// A frame on the wire: the length, then the payload.
pub fn frame(payload: &[u8]) -> Result<Vec<u8>, WireError> {
    if payload.len() > MAX_FRAME {
        return Err(WireError::TooLong(payload.len()));
    }
    let len = u32::try_from(payload.len()).map_err(|_| WireError::TooLong(payload.len()))?;
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(payload);
    Ok(out)
}

/// The payload length a frame header announces, if acceptable.
pub fn frame_len(header: [u8; 4]) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(WireError::TooLong(len));
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> ClusterSecret {
        ClusterSecret::from_file_content(s.as_bytes()).expect("long enough")
    }

    fn announcement() -> Announcement {
        Announcement {
            site: "pharma".into(),
            active: true,
            term: 7,
            pod_cidrs: vec!["10.244.0.0/16".parse().expect("cidr")],
            views: vec![
                "100.64.0.0/16".parse().expect("cidr"),
                "fd63:6175:7365::/64".parse().expect("cidr"),
            ],
            route_via: Some("192.0.2.10".parse().expect("ip")),
            vxlan_vni: 7901,
            vxlan_port: 4792,
        }
    }

    /// Both ends of one connection, after the hello and the first watch.
    fn pair(
        server: &ClusterSecret,
        client: &ClusterSecret,
    ) -> (Session, Session, Result<u64, WireError>) {
        let sn = [1u8; NONCE_LEN];
        let cn = [2u8; NONCE_LEN];
        let hello = hello(&sn);
        let got = parse_hello(&hello).expect("hello");
        let mut c = Session::client(client, &got, &cn);
        let first = first_watch(&cn, &mut c, 0);
        let (nonce, sealed) = split_first_watch(&first).expect("split");
        let mut s = Session::server(server, &sn, &nonce);
        let version = open_watch(&mut s, sealed);
        (s, c, version)
    }

    #[test]
    fn round_trip() {
        let key = secret("a cluster secret of some length");
        let (mut s, mut c, version) = pair(&key, &key);
        assert_eq!(version, Ok(0));
        let sealed = reply(&mut s, 3, &announcement());
        assert_eq!(open_reply(&mut c, &sealed), Ok((3, announcement())));
        // And the next exchange on the same connection.
        let w = watch(&mut c, 3);
        assert_eq!(open_watch(&mut s, &w), Ok(3));
        let sealed = reply(&mut s, 4, &announcement());
        assert_eq!(open_reply(&mut c, &sealed).map(|r| r.0), Ok(4));
    }

    #[test]
    fn secret_trims_whitespace_and_refuses_short_ones() {
        let a = secret("0123456789abcdef0123");
        let b = secret("  0123456789abcdef0123\n");
        let (mut s, mut c, version) = pair(&a, &b);
        assert_eq!(version, Ok(0));
        let sealed = reply(&mut s, 1, &announcement());
        assert!(open_reply(&mut c, &sealed).is_ok());
        assert!(ClusterSecret::from_file_content(b"short\n").is_none());
    }

    #[test]
    fn another_secret_is_refused_both_ways() {
        let (_, _, version) = pair(
            &secret("the gateway's secret...."),
            &secret("a stranger's secret....."),
        );
        assert_eq!(version, Err(WireError::Auth));
        // A reply sealed with another secret does not open at the node.
        let sn = [9u8; NONCE_LEN];
        let cn = [8u8; NONCE_LEN];
        let mut forger = Session::server(&secret("a stranger's secret....."), &sn, &cn);
        let mut node = Session::client(&secret("the gateway's secret...."), &sn, &cn);
        let forged = reply(&mut forger, 1, &announcement());
        assert_eq!(open_reply(&mut node, &forged), Err(WireError::Auth));
    }

    #[test]
    fn replayed_and_tampered_frames_are_refused() {
        let key = secret("a cluster secret of some length");
        let (mut s, mut c, _) = pair(&key, &key);
        let first = reply(&mut s, 1, &announcement());
        assert!(open_reply(&mut c, &first).is_ok());
        // The same frame again on the same connection: out of order.
        assert_eq!(open_reply(&mut c, &first), Err(WireError::Auth));
        // A recorded reply on another connection (other nonces).
        let sn = [5u8; NONCE_LEN];
        let cn = [6u8; NONCE_LEN];
        let mut other = Session::client(&key, &sn, &cn);
        assert_eq!(open_reply(&mut other, &first), Err(WireError::Auth));
        // One flipped bit.
        let mut next = reply(&mut s, 2, &announcement());
        next[3] ^= 1;
        assert_eq!(open_reply(&mut c, &next), Err(WireError::Auth));
        // A replayed first watch against a new hello.
        let cn = [2u8; NONCE_LEN];
        let mut old = Session::client(&key, &[1u8; NONCE_LEN], &cn);
        let recorded = first_watch(&cn, &mut old, 0);
        let (nonce, sealed) = split_first_watch(&recorded).expect("split");
        let mut fresh = Session::server(&key, &[3u8; NONCE_LEN], &nonce);
        assert_eq!(open_watch(&mut fresh, sealed), Err(WireError::Auth));
    }

    #[test]
    fn oversize_short_and_foreign_frames_are_refused() {
        assert_eq!(
            frame_len((MAX_FRAME as u32 + 1).to_be_bytes()),
            Err(WireError::TooLong(MAX_FRAME + 1))
        );
        assert_eq!(frame_len((MAX_FRAME as u32).to_be_bytes()), Ok(MAX_FRAME));
        assert_eq!(
            frame(&vec![0; MAX_FRAME + 1]),
            Err(WireError::TooLong(MAX_FRAME + 1))
        );
        assert_eq!(
            parse_hello(b"HTTP/1.1 200 OK\r\n\r\n"),
            Err(WireError::BadHello)
        );
        assert_eq!(parse_hello(&MAGIC), Err(WireError::BadHello));
        assert_eq!(
            split_first_watch(&[0; 3]).map(|_| ()),
            Err(WireError::TooShort(3))
        );
        let key = secret("a cluster secret of some length");
        let mut s = Session::server(&key, &[0; NONCE_LEN], &[0; NONCE_LEN]);
        assert_eq!(open_watch(&mut s, &[0; 5]), Err(WireError::TooShort(5)));
        // A well-sealed reply whose body is not an announcement.
        let mut gw = Session::server(&key, &[0; NONCE_LEN], &[0; NONCE_LEN]);
        let mut node = Session::client(&key, &[0; NONCE_LEN], &[0; NONCE_LEN]);
        let mut plain = 1u64.to_be_bytes().to_vec();
        plain.extend_from_slice(b"{\"site\": 3}");
        let sealed = gw.seal(&plain);
        assert!(matches!(
            open_reply(&mut node, &sealed),
            Err(WireError::Announcement(_))
        ));
    }
}
