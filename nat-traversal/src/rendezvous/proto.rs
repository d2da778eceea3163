//! The control-stream protocol between a site and a rendezvous: messages,
//! their framing, and the connection close codes. No I/O.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of
//! UTF-8 JSON: one message, an object whose `"type"` names it. Keys and
//! proofs are standard base64 (44 characters, the `wg pubkey` form), socket
//! addresses are strings (`"203.0.113.7:51820"`, `"[2001:db8::7]:51820"`).
//! Unknown fields are ignored (a later version may add some); an unknown
//! message type is a protocol error.

use std::fmt;
use std::net::SocketAddr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use causeway_common::keys;

/// The protocol version a site offers in `Hello`.
pub(crate) const PROTOCOL_VERSION: u32 = 1;

/// Largest frame body accepted from an authenticated site or from the
/// rendezvous (a `Register` with 5,000 peers fits).
pub(crate) const MAX_FRAME_LEN: usize = 256 * 1024;

/// Largest frame body the rendezvous accepts before authentication: a
/// `Hello` is about 200 bytes.
pub(crate) const MAX_HELLO_LEN: usize = 1024;

/// The QUIC ALPN of the rendezvous protocol.
pub(crate) const ALPN: &[u8] = b"causeway-rendezvous/1";

/// Why a connection was closed: the QUIC application close code, sent with
/// a human-readable reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum CloseCode {
    /// Normal close (the site or the rendezvous is shutting down).
    Normal = 0,
    /// The peer broke the protocol (bad frame, unexpected message).
    Protocol = 1,
    /// The site's key is not in the rendezvous' `sites` list, or its proof
    /// did not verify: the rendezvous answers both alike, so that nobody
    /// can ask it which keys it serves.
    UnknownSiteKey = 2,
    /// The site's proof did not verify. Sent by rendezvous of older
    /// versions; this one sends [`Self::UnknownSiteKey`] instead.
    BadProof = 3,
    /// The site pinned another rendezvous key, or the rendezvous could not
    /// prove the pinned key.
    WrongRendezvousKey = 4,
    /// The same site connected again; this older connection is closed.
    Replaced = 5,
    /// Authentication did not finish in time.
    Timeout = 6,
    /// The site speaks a protocol version the rendezvous does not.
    Version = 7,
    /// The peer does not read its control stream fast enough.
    Overloaded = 8,
}

impl CloseCode {
    /// The code as sent on the wire.
    pub fn as_u32(self) -> u32 {
        self as u32
    }

    /// The code for a wire value, if known.
    pub fn from_u64(code: u64) -> Option<Self> {
        Some(match code {
            0 => Self::Normal,
            1 => Self::Protocol,
            2 => Self::UnknownSiteKey,
            3 => Self::BadProof,
            4 => Self::WrongRendezvousKey,
            5 => Self::Replaced,
            6 => Self::Timeout,
            7 => Self::Version,
            8 => Self::Overloaded,
            _ => return None,
        })
    }

    pub(crate) fn varint(self) -> quinn::VarInt {
        quinn::VarInt::from_u32(self.as_u32())
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Normal => "closed",
            Self::Protocol => "protocol error",
            Self::UnknownSiteKey => "unknown site key or bad proof",
            Self::BadProof => "bad proof",
            Self::WrongRendezvousKey => "wrong rendezvous key",
            Self::Replaced => "replaced by a newer connection",
            Self::Timeout => "authentication timed out",
            Self::Version => "unsupported protocol version",
            Self::Overloaded => "control stream overloaded",
        })
    }
}

/// 32 bytes on the wire as base64: a public key or a proof.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Wire32(pub(crate) [u8; 32]);

impl fmt::Debug for Wire32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&keys::encode_bytes(&self.0))
    }
}

impl Serialize for Wire32 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&keys::encode_bytes(&self.0))
    }
}

impl<'de> Deserialize<'de> for Wire32 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        keys::decode_bytes(&text)
            .map(Wire32)
            .map_err(serde::de::Error::custom)
    }
}

/// What a site sends to the rendezvous.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum SiteMessage {
    /// First message: who the site is, which rendezvous key it pinned, and
    /// its proof for this session.
    Hello {
        version: u32,
        site_key: Wire32,
        rendezvous_key: Wire32,
        proof: Wire32,
    },
    /// The site's peers and candidates; sent after `Welcome` and again
    /// whenever either changes. Replaces the previous registration.
    Register {
        peers: Vec<Wire32>,
        candidates: Vec<SocketAddr>,
    },
    /// The site wants a relay port for itself and this peer (a mutual
    /// one); the grant comes in the next `PeerUpdate` about the peer.
    RelayRequest { peer: Wire32 },
}

/// What the rendezvous sends to a site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum RendezvousMessage {
    /// Authentication succeeded: the rendezvous' proof, the site's relay id
    /// and the address the rendezvous sees the site's QUIC socket at.
    Welcome {
        proof: Wire32,
        relay_id: u32,
        observed: SocketAddr,
    },
    /// Authentication failed; the connection is closed with the same code.
    Reject { code: u32, message: String },
    /// A mutually listed peer came online, changed, or went offline.
    PeerUpdate {
        peer: Wire32,
        relay_id: u32,
        candidates: Vec<SocketAddr>,
        online: bool,
        /// The pair's relay port, while there is one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        relay_port: Option<u16>,
        /// This site's token for it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        relay_token: Option<Wire32>,
    },
}

/// A frame that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FrameError {
    /// The length prefix exceeds the decoder's limit.
    #[error("control frame of {len} bytes exceeds the {limit}-byte limit")]
    TooLong {
        /// The announced length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The body is not a valid message.
    #[error("malformed control message: {0}")]
    Malformed(String),
}

/// Encodes one message as a frame.
pub(crate) fn encode_frame<T: Serialize>(message: &T) -> Vec<u8> {
    // Serializing these plain structs to JSON cannot fail.
    let body = serde_json::to_vec(message).unwrap_or_default();
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// Buffer capacity a [`FrameDecoder`] keeps once it has nothing buffered.
const KEPT_BUFFER: usize = 4 * 1024;

/// Accumulates stream bytes and yields whole messages.
#[derive(Debug)]
pub(crate) struct FrameDecoder {
    buf: Vec<u8>,
    limit: usize,
}

impl Default for FrameDecoder {
    /// A decoder of frames up to [`MAX_FRAME_LEN`].
    fn default() -> Self {
        Self::with_limit(MAX_FRAME_LEN)
    }
}

impl FrameDecoder {
    /// A decoder of frames up to `limit` bytes.
    pub(crate) fn with_limit(limit: usize) -> Self {
        Self {
            buf: Vec::new(),
            limit,
        }
    }

    /// Changes the limit (the rendezvous raises it once a site is
    /// authenticated).
    pub(crate) fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    /// Appends bytes read from the stream.
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole message, `Ok(None)` if more bytes are needed. After an
    /// error the stream is unusable (the caller closes the connection).
    pub(crate) fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        let Some(prefix) = self.buf.first_chunk::<4>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*prefix) as usize;
        if len > self.limit {
            return Err(FrameError::TooLong {
                len,
                limit: self.limit,
            });
        }
        let Some(body) = self.buf.get(4..4 + len) else {
            return Ok(None);
        };
        let message =
            serde_json::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()));
        self.buf.drain(..4 + len);
        if self.buf.is_empty() && self.buf.capacity() > KEPT_BUFFER {
            // One large frame (a registration with thousands of peers is up
            // to 256 KiB) must not stay allocated for the life of the
            // connection: a rendezvous holds one decoder per site.
            self.buf = Vec::new();
        }
        message.map(Some)
    }

    /// Bytes buffered but not yet decoded.
    pub(crate) fn buffered(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> Wire32 {
        Wire32([b; 32])
    }

    #[test]
    fn messages_round_trip_in_any_split() {
        let messages = vec![
            SiteMessage::Hello {
                version: 1,
                site_key: key(1),
                rendezvous_key: key(2),
                proof: key(3),
            },
            SiteMessage::Register {
                peers: vec![key(4), key(5)],
                candidates: vec![
                    "192.0.2.1:51820".parse().unwrap(),
                    "[2001:db8::1]:1".parse().unwrap(),
                ],
            },
            SiteMessage::Register {
                peers: vec![],
                candidates: vec![],
            },
            SiteMessage::RelayRequest { peer: key(6) },
        ];
        let mut wire = Vec::new();
        for m in &messages {
            wire.extend(encode_frame(m));
        }
        for chunk in [1, 3, 7, wire.len()] {
            let mut dec = FrameDecoder::default();
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                dec.push(piece);
                while let Some(m) = dec.next::<SiteMessage>().unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got, messages);
            assert_eq!(dec.buffered(), 0);
        }
    }

    #[test]
    fn a_large_frame_does_not_stay_allocated() {
        let big = SiteMessage::Register {
            peers: (0..3_000u32).map(|i| key((i % 251) as u8)).collect(),
            candidates: vec![],
        };
        let small = SiteMessage::Register {
            peers: vec![key(1)],
            candidates: vec![],
        };
        let mut dec = FrameDecoder::default();
        dec.push(&encode_frame(&big));
        assert_eq!(dec.next::<SiteMessage>().unwrap(), Some(big));
        assert!(dec.buf.capacity() <= KEPT_BUFFER, "{}", dec.buf.capacity());
        // Small frames keep their buffer (no allocation per frame).
        for _ in 0..3 {
            dec.push(&encode_frame(&small));
            assert_eq!(dec.next::<SiteMessage>().unwrap(), Some(small.clone()));
        }
        let kept = dec.buf.capacity();
        assert!(kept > 0 && kept <= KEPT_BUFFER);
        // A large frame followed by part of the next keeps what it needs.
        let mut wire = encode_frame(&SiteMessage::Register {
            peers: (0..3_000u32).map(|i| key((i % 251) as u8)).collect(),
            candidates: vec![],
        });
        let next = encode_frame(&small);
        wire.extend_from_slice(&next[..3]);
        dec.push(&wire);
        assert!(dec.next::<SiteMessage>().unwrap().is_some());
        assert_eq!(dec.buffered(), 3);
        dec.push(&next[3..]);
        assert_eq!(dec.next::<SiteMessage>().unwrap(), Some(small));
    }

    #[test]
    fn rendezvous_messages_round_trip() {
        let messages = vec![
            RendezvousMessage::Welcome {
                proof: key(9),
                relay_id: 7,
                observed: "198.51.100.2:40000".parse().unwrap(),
            },
            RendezvousMessage::Reject {
                code: CloseCode::UnknownSiteKey.as_u32(),
                message: "unknown site key".into(),
            },
            RendezvousMessage::PeerUpdate {
                peer: key(1),
                relay_id: 42,
                candidates: vec!["10.0.0.1:51820".parse().unwrap()],
                online: true,
                relay_port: None,
                relay_token: None,
            },
            RendezvousMessage::PeerUpdate {
                peer: key(1),
                relay_id: 42,
                candidates: vec![],
                online: true,
                relay_port: Some(40000),
                relay_token: Some(key(3)),
            },
        ];
        let mut dec = FrameDecoder::default();
        for m in &messages {
            dec.push(&encode_frame(m));
        }
        for m in &messages {
            assert_eq!(dec.next::<RendezvousMessage>().unwrap().as_ref(), Some(m));
        }
        assert_eq!(dec.next::<RendezvousMessage>().unwrap(), None);
    }

    #[test]
    fn wire_form_is_documented_json() {
        let frame = encode_frame(&SiteMessage::Register {
            peers: vec![key(0)],
            candidates: vec!["192.0.2.1:5".parse().unwrap()],
        });
        let body = std::str::from_utf8(&frame[4..]).unwrap();
        assert_eq!(
            body,
            r#"{"type":"register","peers":["AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="],"candidates":["192.0.2.1:5"]}"#
        );
        assert_eq!(
            u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize,
            body.len()
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let cases: Vec<Vec<u8>> = vec![
            // Too long.
            vec![0xff, 0xff, 0xff, 0xff, b'{'],
            // Not JSON.
            [&5u32.to_be_bytes()[..], b"hello"].concat(),
            // JSON, unknown type.
            [&12u32.to_be_bytes()[..], br#"{"type":"x"}"#].concat(),
            // Bad key.
            {
                let body = br#"{"type":"register","peers":["short"],"candidates":[]}"#;
                [&(body.len() as u32).to_be_bytes()[..], body].concat()
            },
            // Bad address.
            {
                let body = br#"{"type":"register","peers":[],"candidates":["nope"]}"#;
                [&(body.len() as u32).to_be_bytes()[..], body].concat()
            },
            // Invalid UTF-8.
            [&2u32.to_be_bytes()[..], &[0xc3, 0x28]].concat(),
        ];
        for case in cases {
            let mut dec = FrameDecoder::default();
            dec.push(&case);
            assert!(dec.next::<SiteMessage>().is_err(), "{case:?}");
        }
        // Random bytes never panic.
        let mut seed = 0x1234_5678u32;
        for _ in 0..2000 {
            let mut dec = FrameDecoder::default();
            let len = (seed % 64) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (seed >> 16) as u8
                })
                .collect();
            dec.push(&bytes);
            let _ = dec.next::<RendezvousMessage>();
        }
        // A partial frame is not an error.
        let mut dec = FrameDecoder::default();
        dec.push(&[0, 0]);
        assert_eq!(dec.next::<SiteMessage>(), Ok(None));
    }

    #[test]
    fn the_limit_is_checked_on_the_length_prefix() {
        let hello = encode_frame(&SiteMessage::Hello {
            version: 1,
            site_key: key(1),
            rendezvous_key: key(2),
            proof: key(3),
        });
        assert!(hello.len() - 4 <= MAX_HELLO_LEN / 4, "{}", hello.len());
        let mut dec = FrameDecoder::with_limit(MAX_HELLO_LEN);
        dec.push(&hello);
        assert!(dec.next::<SiteMessage>().unwrap().is_some());
        // An oversized frame is refused on its first 4 bytes, before its body.
        let mut dec = FrameDecoder::with_limit(MAX_HELLO_LEN);
        dec.push(&((MAX_HELLO_LEN + 1) as u32).to_be_bytes());
        assert_eq!(
            dec.next::<SiteMessage>(),
            Err(FrameError::TooLong {
                len: MAX_HELLO_LEN + 1,
                limit: MAX_HELLO_LEN
            })
        );
        // Raised after authentication.
        let mut dec = FrameDecoder::with_limit(MAX_HELLO_LEN);
        dec.set_limit(MAX_FRAME_LEN);
        dec.push(&((MAX_HELLO_LEN + 1) as u32).to_be_bytes());
        assert_eq!(dec.next::<SiteMessage>(), Ok(None));
    }

    #[test]
    fn close_codes_round_trip() {
        for code in 0..9u64 {
            let c = CloseCode::from_u64(code).unwrap();
            assert_eq!(u64::from(c.as_u32()), code);
        }
        assert_eq!(CloseCode::from_u64(99), None);
    }
}
