//! Fuzzing entry points: not an API. Each function takes untrusted bytes,
//! feeds them to one parser of the crate, panics when a property fails, and
//! returns whether the parser accepted the input. The in-suite fuzz pass
//! (`tests/fuzz.rs`) and the cargo-fuzz targets (`fuzz/`) call these same
//! functions; docs/fuzzing.md says how to run them.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use x25519_dalek::{PublicKey, StaticSecret};

use crate::portmap::{self, MapperConfig, PortMapper, Response};
use crate::probe::{self, Probe, ProbeKey};
use crate::rendezvous::proto::{FrameDecoder, RendezvousMessage, SiteMessage, encode_frame};
use crate::rendezvous::relay::{self, Reassembler};
use crate::rendezvous::tcp::{self, Record};
use crate::stun::{self, StunMessage};

/// A STUN datagram: parsing never panics; an accepted message passes
/// `is_stun`, and the Binding messages we encode ourselves parse back to
/// the same message.
pub fn stun(data: &[u8]) -> bool {
    let Ok(message) = stun::parse(data) else {
        return false;
    };
    assert!(stun::is_stun(data), "parsed a datagram is_stun refuses");
    let mut out = [0u8; stun::MAX_ENCODED_LEN];
    let again = match message {
        StunMessage::BindingRequest { tx } => {
            let n = stun::encode_binding_request(&tx, &mut out);
            Some(stun::parse(&out[..n]))
        }
        StunMessage::BindingSuccess { tx, mapped } => {
            let n = stun::encode_binding_success(&tx, mapped, &mut out);
            Some(stun::parse(&out[..n]))
        }
        StunMessage::BindingError { tx, code } => {
            assert!((300..=699).contains(&code), "error code {code}");
            let n = stun::encode_binding_error(&tx, code, &mut out);
            Some(stun::parse(&out[..n]))
        }
        StunMessage::Other { .. } => None,
    };
    if let Some(again) = again {
        assert_eq!(again, Ok(message), "re-encoded STUN message differs");
    }
    true
}

/// A stream of TLS-over-TCP records, read in pieces of any size (the first
/// byte of the input picks the piece size): decoding never panics, a
/// record's body is at most 65535 bytes, control and datagram records
/// encode back to the bytes they came from, and once a record is refused
/// the stream is given up (as the connection would be).
pub fn tcp_records(data: &[u8]) -> bool {
    let Some((&step, stream)) = data.split_first() else {
        return false;
    };
    let step = usize::from(step).max(1);
    let mut buf = bytes::BytesMut::new();
    let mut accepted = false;
    for piece in stream.chunks(step) {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.clone();
            match tcp::decode(&mut buf) {
                Ok(Some(record)) => {
                    accepted = true;
                    let (kind, body) = match &record {
                        Record::Control(b) => (tcp::CONTROL, b),
                        Record::Datagram(b) => (tcp::DATAGRAM, b),
                        Record::Close(..) => continue,
                    };
                    assert!(body.len() <= usize::from(u16::MAX));
                    let again = tcp::encode(kind, body);
                    assert_eq!(
                        &before[..again.len()],
                        &again[..],
                        "re-encoded record differs"
                    );
                }
                Ok(None) => break,
                Err(_) => return accepted,
            }
        }
    }
    accepted
}

/// The nonce and internal port the portmap target's mapper uses.
pub const PORTMAP_NONCE: [u8; 12] = [0x5c; 12];
/// See [`PORTMAP_NONCE`].
pub const PORTMAP_PORT: u16 = 51820;

/// An answer from a PCP / NAT-PMP server: parsing never panics; an
/// accepted PCP message has a valid length (24..=1100, a multiple of 4);
/// a mapper waiting for PCP or for NAT-PMP answers takes or refuses it
/// without panicking, and whatever it maps has a usable address, port and
/// lifetime.
pub fn portmap(data: &[u8]) -> bool {
    let parsed = portmap::parse(data);
    if let Ok(Response::PcpMap { .. } | Response::PcpError { .. }) = parsed {
        assert!(
            (24..=1100).contains(&data.len()) && data.len().is_multiple_of(4),
            "accepted a PCP message of {} bytes",
            data.len()
        );
    }
    let t0 = Instant::now();
    let config = MapperConfig::new(PORTMAP_PORT, std::net::Ipv4Addr::new(192, 168, 1, 20));
    let mut pcp = PortMapper::new(config, PORTMAP_NONCE, t0);
    // A second mapper that fell back to NAT-PMP.
    let mut pmp = PortMapper::new(config, PORTMAP_NONCE, t0);
    let _ = pmp.handle_response(t0, &[0, 129, 0, 1, 0, 0, 0, 0]);
    for mapper in [&mut pcp, &mut pmp] {
        let _ = mapper.handle_response(t0, data);
        while let Some(event) = mapper.poll_event() {
            if let portmap::Event::Mapped(m) = event {
                assert!(!m.external.ip().is_unspecified() && m.external.port() != 0);
                assert!(m.lifetime > Duration::ZERO);
            }
        }
    }
    parsed.is_ok()
}

/// The probe keys the probe target uses: (ours, the peer's).
pub fn probe_keys() -> &'static (ProbeKey, ProbeKey) {
    static KEYS: OnceLock<(ProbeKey, ProbeKey)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let ours = StaticSecret::from([0x5a; 32]);
        let peer = StaticSecret::from([0xa5; 32]);
        let derive = |own: &StaticSecret, other: &StaticSecret| {
            ProbeKey::derive(own, &PublicKey::from(other)).expect("fixed keys derive")
        };
        (derive(&ours, &peer), derive(&peer, &ours))
    })
}

/// A path probe, opened with our key for the peer: never panics; an
/// accepted probe names the peer as sender and re-encodes with the peer's
/// key to exactly the same bytes (the MAC is deterministic).
pub fn probe(data: &[u8]) -> bool {
    let (ours, peer) = probe_keys();
    let shaped = probe::is_probe(data);
    assert_eq!(probe::sender(data).is_some(), shaped);
    let Ok(opened) = probe::open(ours, data) else {
        return false;
    };
    assert!(shaped, "opened a datagram is_probe refuses");
    assert_eq!(probe::sender(data), Some(*peer.own_public()));
    let mut out = [0u8; probe::MAX_PROBE_LEN];
    let n = probe::encode(peer, &opened, &mut out);
    assert_eq!(&out[..n], data, "re-encoded probe differs");
    if let Probe::Pong { observed, .. } = opened {
        assert!(matches!(
            (observed, data.len()),
            (SocketAddr::V4(_), probe::PONG_V4_LEN) | (SocketAddr::V6(_), probe::PONG_V6_LEN)
        ));
    }
    true
}

/// A control stream, as both ends decode it. The first byte is the size of
/// the reads the bytes arrive in (1..=256), the rest is the stream. Never
/// panics; every decoded message encodes to a frame that decodes to the
/// same message; decoding stops at the first error, as the drivers do.
pub fn rendezvous_frames(data: &[u8]) -> bool {
    let Some((&chunk, stream)) = data.split_first() else {
        return false;
    };
    let chunk = usize::from(chunk) + 1;
    let site = decode_all::<SiteMessage>(stream, chunk);
    let rendezvous = decode_all::<RendezvousMessage>(stream, chunk);
    site || rendezvous
}

fn decode_all<T>(stream: &[u8], chunk: usize) -> bool
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let mut decoder = FrameDecoder::default();
    let mut any = false;
    for piece in stream.chunks(chunk) {
        decoder.push(piece);
        loop {
            match decoder.next::<T>() {
                Ok(Some(message)) => {
                    any = true;
                    let mut again = FrameDecoder::default();
                    again.push(&encode_frame(&message));
                    match again.next::<T>() {
                        Ok(Some(m)) => assert_eq!(m, message, "frame round trip"),
                        other => panic!("re-encoded frame of {message:?} decodes to {other:?}"),
                    }
                    assert_eq!(again.buffered(), 0);
                }
                Ok(None) => break,
                Err(_) => return any,
            }
        }
    }
    any
}

/// Bounds of the reassembler under fuzzing: small, so eviction happens.
const FUZZ_MAX_PACKETS: usize = 8;
const FUZZ_MAX_BYTES: usize = 128 << 10;

/// Relay datagrams into a reassembler, as a program of operations read
/// from the bytes (so both the in-suite pass and libFuzzer drive it):
///
/// - `0`, len, src, bytes…: one raw datagram from sender `src`;
/// - `1`, t: time moves on by `t` × 10 ms;
/// - `2`, len (u16), size, order, bytes…: a real packet of `len` bytes,
///   fragmented to datagrams of `size + 14` bytes, split again by the
///   rendezvous for a receiver when `order` is odd, fed in an order
///   derived from `order`, with a duplicate of one fragment.
///
/// Properties: parsing never panics and an accepted header fits its packet;
/// after every datagram the reassembler holds at most its packet and byte
/// bounds, and its byte count is the sum of what it holds; a real packet
/// comes back whole, exactly once.
pub fn relay(data: &[u8]) -> bool {
    let mut reassembler =
        Reassembler::new(relay::REASSEMBLY_TIMEOUT, FUZZ_MAX_PACKETS, FUZZ_MAX_BYTES);
    let mut now = Instant::now();
    let mut rest = data;
    let mut next_packet_id = 0u32;
    let mut accepted = false;
    let take = |rest: &mut &[u8], n: usize| -> Option<Vec<u8>> {
        let n = n.min(rest.len());
        let (head, tail) = rest.split_at(n);
        *rest = tail;
        Some(head.to_vec()).filter(|h| !h.is_empty())
    };
    while let Some((&op, tail)) = rest.split_first() {
        rest = tail;
        match op % 3 {
            0 => {
                let Some(head) = take(&mut rest, 2) else {
                    break;
                };
                let len = usize::from(head[0]);
                let src = u32::from(*head.get(1).unwrap_or(&0));
                let datagram = take(&mut rest, len).unwrap_or_default();
                if let Ok((header, payload)) = relay::parse(&datagram) {
                    accepted = true;
                    assert_eq!(payload.len() + relay::HEADER_LEN, datagram.len());
                    assert!(
                        usize::from(header.offset) + payload.len() <= usize::from(header.total_len)
                    );
                    if let Some(packet) = reassembler.push(now, src, &header, payload) {
                        assert_eq!(packet.len(), usize::from(header.total_len));
                    }
                }
                check_bounds(&reassembler);
            }
            1 => {
                let Some(t) = take(&mut rest, 1) else { break };
                now += Duration::from_millis(10 * u64::from(t[0]));
                reassembler.expire(now);
                check_bounds(&reassembler);
            }
            _ => {
                let Some(head) = take(&mut rest, 4) else {
                    break;
                };
                let Some(&[len_hi, len_lo, size, order]) = head.first_chunk::<4>() else {
                    break;
                };
                let len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
                let mut packet = take(&mut rest, len).unwrap_or_default();
                if packet.is_empty() {
                    packet.push(order);
                }
                let max_datagram = usize::from(size) + relay::HEADER_LEN + 1;
                // A sender no raw datagram can name, and a fresh packet id.
                let src = 1 << 16;
                next_packet_id += 1;
                let Ok(mut datagrams) = relay::fragment(src, next_packet_id, &packet, max_datagram)
                else {
                    panic!("fragmenting {} bytes to {max_datagram}", packet.len());
                };
                assert!(datagrams.iter().all(|d| d.len() <= max_datagram));
                if order % 2 == 1 {
                    let smaller = (max_datagram / 2).max(relay::HEADER_LEN + 1);
                    let mut split = Vec::new();
                    for d in &datagrams {
                        let Ok((h, p)) = relay::parse(d) else {
                            panic!("our own fragment does not parse");
                        };
                        let Ok(again) = relay::readdress(h, p, src, smaller) else {
                            panic!("readdressing to {smaller}");
                        };
                        split.extend(again);
                    }
                    datagrams = split;
                }
                // A deterministic shuffle and one duplicate.
                let n = datagrams.len();
                let rot = usize::from(order) % n;
                datagrams.rotate_left(rot);
                if order & 4 != 0 {
                    datagrams.reverse();
                }
                // (A whole packet in one datagram is delivered each time it
                // comes: replays are WireGuard's to refuse, not the relay's.)
                if n > 1 {
                    let dup = datagrams[usize::from(order) % n].clone();
                    datagrams.insert(usize::from(order / 2) % (n + 1), dup);
                }
                let mut delivered = Vec::new();
                for d in &datagrams {
                    let Ok((h, p)) = relay::parse(d) else {
                        panic!("our own fragment does not parse");
                    };
                    delivered.extend(reassembler.push(now, src, &h, p));
                    check_bounds(&reassembler);
                }
                assert_eq!(delivered, vec![packet], "reassembled packet");
                accepted = true;
            }
        }
    }
    accepted
}

fn check_bounds(reassembler: &Reassembler) {
    let held = reassembler.held();
    assert!(held.packets <= FUZZ_MAX_PACKETS, "{held:?}");
    assert!(held.bytes <= FUZZ_MAX_BYTES, "{held:?}");
    assert_eq!(held.bytes, held.bytes_in_buffers, "{held:?}");
}
