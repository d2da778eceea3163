//! Relay datagrams: the header, fragmentation to the QUIC datagram size, and
//! bounded reassembly. No I/O; reassembly takes `now`.
//!
//! Every relay datagram (site → rendezvous and rendezvous → site) is
//!
//! ```text
//!  0      1               5               9              11             13
//! +------+---------------+---------------+--------------+--------------+---------
//! | 0x01 | relay id u32  | packet id u32 | total len u16| offset u16   | payload…
//! +------+---------------+---------------+--------------+--------------+---------
//! ```
//!
//! big-endian. From a site, `relay id` names the destination site; the
//! rendezvous rewrites it to the source site's id before forwarding, so the
//! receiver knows who sent it. `packet id` is chosen by the sender (a
//! counter); `total len` is the length of the whole WireGuard packet and
//! `offset` where this payload goes in it. Offsets rather than fragment
//! numbers let the rendezvous split a fragment again when the receiving
//! site's connection carries smaller datagrams than the sending site's.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};

/// The first byte of a relay datagram (version 1).
pub(crate) const KIND_RELAY_V1: u8 = 0x01;
/// Length of the relay header.
pub(crate) const HEADER_LEN: usize = 13;
/// How long a partly received packet waits for its other fragments.
pub(crate) const REASSEMBLY_TIMEOUT: Duration = Duration::from_secs(1);
/// Most packets being reassembled at once (per connection).
pub(crate) const MAX_PARTIAL_PACKETS: usize = 256;
/// Most bytes held for reassembly at once (per connection).
pub(crate) const MAX_PARTIAL_BYTES: usize = 4 << 20;
/// Most disjoint received ranges tracked for one packet; more means a
/// misbehaving sender and the packet is dropped.
const MAX_RANGES: usize = 64;

/// The parsed header of a relay datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RelayHeader {
    /// Destination (from a site) or source (from the rendezvous) relay id.
    pub(crate) relay_id: u32,
    /// Sender-chosen packet number.
    pub(crate) packet_id: u32,
    /// Length of the whole packet.
    pub(crate) total_len: u16,
    /// Where this datagram's payload starts in the packet.
    pub(crate) offset: u16,
}

/// Why a datagram is not a valid relay datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RelayParseError {
    /// Shorter than the header plus one byte.
    #[error("relay datagram too short")]
    TooShort,
    /// Unknown first byte.
    #[error("unknown relay datagram kind {0:#04x}")]
    UnknownKind(u8),
    /// The payload does not fit the announced packet.
    #[error("relay fragment out of bounds")]
    OutOfBounds,
}

/// Why a packet cannot be sent through the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FragmentError {
    /// An empty packet.
    #[error("empty packet")]
    Empty,
    /// A packet longer than 65535 bytes.
    #[error("packet of {0} bytes is larger than the relay's 65535-byte limit")]
    TooLarge(usize),
    /// The connection's datagrams are too small to carry a header and data.
    #[error("the connection carries datagrams of at most {0} bytes, too small for the relay")]
    DatagramTooSmall(usize),
}

/// Parses a relay datagram into its header and payload.
pub(crate) fn parse(datagram: &[u8]) -> Result<(RelayHeader, &[u8]), RelayParseError> {
    let Some((head, payload)) = datagram.split_first_chunk::<HEADER_LEN>() else {
        return Err(RelayParseError::TooShort);
    };
    if payload.is_empty() {
        return Err(RelayParseError::TooShort);
    }
    if head[0] != KIND_RELAY_V1 {
        return Err(RelayParseError::UnknownKind(head[0]));
    }
    let header = RelayHeader {
        relay_id: u32::from_be_bytes([head[1], head[2], head[3], head[4]]),
        packet_id: u32::from_be_bytes([head[5], head[6], head[7], head[8]]),
        total_len: u16::from_be_bytes([head[9], head[10]]),
        offset: u16::from_be_bytes([head[11], head[12]]),
    };
    if usize::from(header.offset) + payload.len() > usize::from(header.total_len) {
        return Err(RelayParseError::OutOfBounds);
    }
    Ok((header, payload))
}

fn write(header: &RelayHeader, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(HEADER_LEN + payload.len());
    out.put_u8(KIND_RELAY_V1);
    out.put_u32(header.relay_id);
    out.put_u32(header.packet_id);
    out.put_u16(header.total_len);
    out.put_u16(header.offset);
    out.put_slice(payload);
    out.freeze()
}

/// Splits `payload` (which starts at `header.offset` of its packet) into
/// datagrams of at most `max_datagram` bytes.
fn split(
    header: RelayHeader,
    payload: &[u8],
    max_datagram: usize,
) -> Result<Vec<Bytes>, FragmentError> {
    let room = max_datagram
        .checked_sub(HEADER_LEN)
        .filter(|room| *room > 0)
        .ok_or(FragmentError::DatagramTooSmall(max_datagram))?;
    let mut out = Vec::with_capacity(payload.len().div_ceil(room));
    let mut offset = usize::from(header.offset);
    for piece in payload.chunks(room) {
        let offset16 = u16::try_from(offset).map_err(|_| FragmentError::TooLarge(offset))?;
        out.push(write(
            &RelayHeader {
                offset: offset16,
                ..header
            },
            piece,
        ));
        offset += piece.len();
    }
    Ok(out)
}

/// The datagrams that carry `packet` to relay id `relay_id`, each at most
/// `max_datagram` bytes.
pub(crate) fn fragment(
    relay_id: u32,
    packet_id: u32,
    packet: &[u8],
    max_datagram: usize,
) -> Result<Vec<Bytes>, FragmentError> {
    if packet.is_empty() {
        return Err(FragmentError::Empty);
    }
    // The largest packet the relay carries is what the header's u16 length holds.
    let total_len =
        u16::try_from(packet.len()).map_err(|_| FragmentError::TooLarge(packet.len()))?;
    let header = RelayHeader {
        relay_id,
        packet_id,
        total_len,
        offset: 0,
    };
    split(header, packet, max_datagram)
}

/// What the rendezvous forwards for a datagram it received: the same
/// fragment addressed with `src_relay_id`, split again if the receiving
/// connection's datagrams are smaller.
pub(crate) fn readdress(
    header: RelayHeader,
    payload: &[u8],
    src_relay_id: u32,
    max_datagram: usize,
) -> Result<Vec<Bytes>, FragmentError> {
    split(
        RelayHeader {
            relay_id: src_relay_id,
            ..header
        },
        payload,
        max_datagram,
    )
}

/// Reassembly counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReassemblyStats {
    /// Packets delivered whole (fragmented or not).
    pub(crate) delivered: u64,
    /// Partly received packets dropped: timed out, evicted for room, or
    /// contradicting their own earlier fragments.
    pub(crate) dropped_incomplete: u64,
}

struct Partial {
    first_seen: Instant,
    buf: Vec<u8>,
    /// Sorted, disjoint, non-adjacent received byte ranges `[start, end)`.
    ranges: Vec<(usize, usize)>,
}

impl Partial {
    /// Records `[start, end)`; false if the packet has become too ragged.
    fn add(&mut self, start: usize, end: usize) -> bool {
        let mut merged = (start, end);
        let mut out = Vec::with_capacity(self.ranges.len() + 1);
        let mut placed = false;
        for &(s, e) in &self.ranges {
            if e < merged.0 {
                out.push((s, e));
            } else if s > merged.1 {
                if !placed {
                    out.push(merged);
                    placed = true;
                }
                out.push((s, e));
            } else {
                merged = (merged.0.min(s), merged.1.max(e));
            }
        }
        if !placed {
            out.push(merged);
        }
        self.ranges = out;
        self.ranges.len() <= MAX_RANGES
    }

    fn complete(&self) -> bool {
        self.ranges.len() == 1 && self.ranges[0] == (0, self.buf.len())
    }
}

type Key = (u32, u32);

/// What a [`Reassembler`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Held {
    /// Packets waiting for fragments.
    pub(crate) packets: usize,
    /// Bytes reserved for them, as counted against the bound.
    pub(crate) bytes: usize,
    /// The same, summed over the buffers themselves.
    pub(crate) bytes_in_buffers: usize,
}

/// Puts fragmented packets back together, within fixed bounds of memory and
/// time. Keyed by (sender relay id, packet id).
pub(crate) struct Reassembler {
    partial: HashMap<Key, Partial>,
    /// Keys in arrival order of their first fragment (may hold stale keys of
    /// packets already completed; those are skipped).
    order: VecDeque<(Key, Instant)>,
    bytes: usize,
    timeout: Duration,
    max_packets: usize,
    max_bytes: usize,
    pub(crate) stats: ReassemblyStats,
}

impl Default for Reassembler {
    fn default() -> Self {
        Self::new(REASSEMBLY_TIMEOUT, MAX_PARTIAL_PACKETS, MAX_PARTIAL_BYTES)
    }
}

impl Reassembler {
    pub(crate) fn new(timeout: Duration, max_packets: usize, max_bytes: usize) -> Self {
        Self {
            partial: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            timeout,
            max_packets: max_packets.max(1),
            max_bytes,
            stats: ReassemblyStats::default(),
        }
    }

    /// Number of packets waiting for fragments.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.partial.len()
    }

    /// What is held for reassembly (for the fuzz target's bound checks).
    pub(crate) fn held(&self) -> Held {
        Held {
            packets: self.partial.len(),
            bytes: self.bytes,
            bytes_in_buffers: self.partial.values().map(|p| p.buf.len()).sum(),
        }
    }

    /// Takes one datagram's header and payload (as [`parse`] returned them)
    /// from sender `src`; returns the whole packet once it is complete.
    pub(crate) fn push(
        &mut self,
        now: Instant,
        src: u32,
        header: &RelayHeader,
        payload: &[u8],
    ) -> Option<Vec<u8>> {
        let total = usize::from(header.total_len);
        let start = usize::from(header.offset);
        let end = start + payload.len();
        if end > total || payload.is_empty() {
            return None;
        }
        if start == 0 && end == total {
            self.stats.delivered += 1;
            return Some(payload.to_vec());
        }
        self.expire(now);
        let key = (src, header.packet_id);
        if !self.partial.contains_key(&key) {
            if total > self.max_bytes {
                self.stats.dropped_incomplete += 1;
                return None;
            }
            while self.partial.len() >= self.max_packets || self.bytes + total > self.max_bytes {
                if !self.evict_oldest() {
                    break;
                }
            }
            self.partial.insert(
                key,
                Partial {
                    first_seen: now,
                    buf: vec![0; total],
                    ranges: Vec::new(),
                },
            );
            self.bytes += total;
            self.order.push_back((key, now));
            self.compact();
        }
        let Entry::Occupied(mut entry) = self.partial.entry(key) else {
            return None;
        };
        let partial = entry.get_mut();
        if partial.buf.len() != total {
            // A fragment that contradicts the packet's length: drop it all.
            let gone = entry.remove();
            self.bytes -= gone.buf.len();
            self.stats.dropped_incomplete += 1;
            return None;
        }
        partial.buf[start..end].copy_from_slice(payload);
        if !partial.add(start, end) {
            let gone = entry.remove();
            self.bytes -= gone.buf.len();
            self.stats.dropped_incomplete += 1;
            return None;
        }
        if partial.complete() {
            let done = entry.remove();
            self.bytes -= done.buf.len();
            self.stats.delivered += 1;
            return Some(done.buf);
        }
        None
    }

    /// When [`expire`](Self::expire) has something to drop next (`None`
    /// when nothing waits). May be early: a packet completed since does not
    /// count, but is only skipped when that time comes.
    pub(crate) fn next_expiry(&self) -> Option<Instant> {
        self.order.front().map(|&(_, seen)| seen + self.timeout)
    }

    /// Drops packets whose first fragment is older than the timeout.
    pub(crate) fn expire(&mut self, now: Instant) {
        while let Some(&(key, seen)) = self.order.front() {
            if now.saturating_duration_since(seen) < self.timeout {
                break;
            }
            self.order.pop_front();
            self.remove_if_live(key, seen);
        }
    }

    fn remove_if_live(&mut self, key: Key, seen: Instant) -> bool {
        match self.partial.get(&key) {
            Some(p) if p.first_seen == seen => {
                if let Some(gone) = self.partial.remove(&key) {
                    self.bytes -= gone.buf.len();
                }
                self.stats.dropped_incomplete += 1;
                true
            }
            _ => false,
        }
    }

    fn evict_oldest(&mut self) -> bool {
        while let Some((key, seen)) = self.order.pop_front() {
            if self.remove_if_live(key, seen) {
                return true;
            }
        }
        false
    }

    /// Keeps the order queue from growing with keys of completed packets.
    fn compact(&mut self) {
        if self.order.len() > 4 * self.max_packets + 64 {
            let partial = &self.partial;
            self.order
                .retain(|(key, seen)| partial.get(key).is_some_and(|p| p.first_seen == *seen));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + 3) as u8).collect()
    }

    fn reassemble(r: &mut Reassembler, now: Instant, dgrams: &[Bytes], src: u32) -> Vec<Vec<u8>> {
        dgrams
            .iter()
            .filter_map(|d| {
                let (h, p) = parse(d).unwrap();
                r.push(now, src, &h, p)
            })
            .collect()
    }

    #[test]
    fn full_size_packet_fragments_and_reassembles() {
        let now = Instant::now();
        let pkt = packet(1452);
        for max in [1200, 1162, 1300, 1452 + HEADER_LEN, 200, 14] {
            let dgrams = fragment(9, 1, &pkt, max).unwrap();
            assert!(dgrams.iter().all(|d| d.len() <= max), "{max}");
            assert_eq!(dgrams.len(), 1452usize.div_ceil(max - HEADER_LEN));
            let mut r = Reassembler::default();
            assert_eq!(reassemble(&mut r, now, &dgrams, 9), vec![pkt.clone()]);
            // Reverse order works too.
            let mut rev = dgrams.clone();
            rev.reverse();
            let mut r = Reassembler::default();
            assert_eq!(reassemble(&mut r, now, &rev, 9), vec![pkt.clone()]);
            assert_eq!(r.pending(), 0);
        }
    }

    #[test]
    fn small_packet_is_one_datagram() {
        let pkt = packet(60);
        let dgrams = fragment(3, 77, &pkt, 1200).unwrap();
        assert_eq!(dgrams.len(), 1);
        assert_eq!(dgrams[0].len(), 60 + HEADER_LEN);
        let (h, p) = parse(&dgrams[0]).unwrap();
        assert_eq!(
            h,
            RelayHeader {
                relay_id: 3,
                packet_id: 77,
                total_len: 60,
                offset: 0
            }
        );
        assert_eq!(p, &pkt[..]);
        let mut r = Reassembler::default();
        assert_eq!(r.push(Instant::now(), 3, &h, p), Some(pkt));
        assert_eq!(r.pending(), 0);
    }

    #[test]
    fn rendezvous_splits_again_for_a_smaller_receiver() {
        let now = Instant::now();
        let pkt = packet(1452);
        let from_site = fragment(5, 9, &pkt, 1400).unwrap();
        assert_eq!(from_site.len(), 2);
        let mut forwarded = Vec::new();
        for d in &from_site {
            let (h, p) = parse(d).unwrap();
            assert_eq!(h.relay_id, 5);
            forwarded.extend(readdress(h, p, 11, 600).unwrap());
        }
        assert!(forwarded.len() > 2);
        assert!(forwarded.iter().all(|d| d.len() <= 600));
        assert!(forwarded.iter().all(|d| parse(d).unwrap().0.relay_id == 11));
        let mut r = Reassembler::default();
        assert_eq!(reassemble(&mut r, now, &forwarded, 11), vec![pkt]);
    }

    #[test]
    fn fragment_errors() {
        assert_eq!(fragment(1, 1, &[], 1200), Err(FragmentError::Empty));
        assert_eq!(
            fragment(1, 1, &vec![0; 70_000], 1200),
            Err(FragmentError::TooLarge(70_000))
        );
        assert_eq!(
            fragment(1, 1, &[1], HEADER_LEN),
            Err(FragmentError::DatagramTooSmall(HEADER_LEN))
        );
        assert!(fragment(1, 1, &vec![0; 65535], 1200).is_ok());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert_eq!(parse(&[]), Err(RelayParseError::TooShort));
        assert_eq!(parse(&[1; 13]), Err(RelayParseError::TooShort));
        let mut d = fragment(1, 1, &[1, 2, 3], 100).unwrap()[0].to_vec();
        d[0] = 0x7f;
        assert_eq!(parse(&d), Err(RelayParseError::UnknownKind(0x7f)));
        // offset + len > total.
        let mut d = fragment(1, 1, &[1, 2, 3], 100).unwrap()[0].to_vec();
        d[12] = 1;
        assert_eq!(parse(&d), Err(RelayParseError::OutOfBounds));
        let mut seed = 7u32;
        let mut r = Reassembler::default();
        let now = Instant::now();
        for _ in 0..5000 {
            let len = (seed % 40) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|i| {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    if i == 0 { 1 } else { (seed >> 16) as u8 }
                })
                .collect();
            if let Ok((h, p)) = parse(&bytes) {
                let _ = r.push(now, 1, &h, p);
            }
        }
        assert!(r.pending() <= MAX_PARTIAL_PACKETS);
    }

    #[test]
    fn incomplete_packets_time_out_and_are_counted() {
        let t0 = Instant::now();
        let pkt = packet(1452);
        let dgrams = fragment(1, 1, &pkt, 1000).unwrap();
        let mut r = Reassembler::default();
        let (h, p) = parse(&dgrams[0]).unwrap();
        assert_eq!(r.push(t0, 1, &h, p), None);
        assert_eq!(r.pending(), 1);
        r.expire(t0 + Duration::from_millis(999));
        assert_eq!(r.pending(), 1);
        r.expire(t0 + REASSEMBLY_TIMEOUT);
        assert_eq!(r.pending(), 0);
        assert_eq!(r.stats.dropped_incomplete, 1);
        // The late second half alone does not produce a packet.
        let (h, p) = parse(&dgrams[1]).unwrap();
        assert_eq!(r.push(t0 + REASSEMBLY_TIMEOUT, 1, &h, p), None);
    }

    #[test]
    fn table_is_bounded() {
        let now = Instant::now();
        let mut r = Reassembler::new(REASSEMBLY_TIMEOUT, 4, 1 << 20);
        for id in 0..10u32 {
            let dgrams = fragment(1, id, &packet(2000), 1000).unwrap();
            let (h, p) = parse(&dgrams[0]).unwrap();
            assert_eq!(r.push(now, 1, &h, p), None);
        }
        assert_eq!(r.pending(), 4);
        assert_eq!(r.stats.dropped_incomplete, 6);
        // The newest ones survive and complete.
        let dgrams = fragment(1, 9, &packet(2000), 1000).unwrap();
        let got: Vec<_> = dgrams[1..]
            .iter()
            .filter_map(|d| {
                let (h, p) = parse(d).unwrap();
                r.push(now, 1, &h, p)
            })
            .collect();
        assert_eq!(got, vec![packet(2000)]);

        // Byte bound.
        let mut r = Reassembler::new(REASSEMBLY_TIMEOUT, 100, 5000);
        for id in 0..5u32 {
            let dgrams = fragment(1, id, &packet(2000), 1000).unwrap();
            let (h, p) = parse(&dgrams[0]).unwrap();
            r.push(now, 1, &h, p);
        }
        assert_eq!(r.pending(), 2);
        // Many completed packets do not grow the order queue without bound.
        let mut r = Reassembler::new(REASSEMBLY_TIMEOUT, 4, 1 << 20);
        for id in 0..10_000u32 {
            let dgrams = fragment(2, id, &packet(1500), 1000).unwrap();
            assert_eq!(reassemble(&mut r, now, &dgrams, 2).len(), 1);
        }
        assert!(r.order.len() <= 4 * 4 + 64 + 1);
    }

    #[test]
    fn senders_and_contradictions_are_kept_apart() {
        let now = Instant::now();
        let a = fragment(1, 5, &packet(1500), 1000).unwrap();
        let b = fragment(2, 5, &vec![9; 1500], 1000).unwrap();
        let mut r = Reassembler::default();
        let mut got = reassemble(&mut r, now, &[a[0].clone(), b[0].clone()], 0);
        assert!(got.is_empty());
        // Same packet id from different senders: push with their own src.
        let mut r = Reassembler::default();
        for (src, d) in [(1, &a[0]), (2, &b[0]), (1, &a[1]), (2, &b[1])] {
            let (h, p) = parse(d).unwrap();
            got.extend(r.push(now, src, &h, p));
        }
        assert_eq!(got, vec![packet(1500), vec![9; 1500]]);
        // A fragment announcing another total length drops the packet.
        let c = fragment(1, 6, &packet(1500), 1000).unwrap();
        let d = fragment(1, 6, &packet(1600), 1000).unwrap();
        let (h, p) = parse(&c[0]).unwrap();
        assert_eq!(r.push(now, 1, &h, p), None);
        let (h, p) = parse(&d[1]).unwrap();
        assert_eq!(r.push(now, 1, &h, p), None);
        assert_eq!(r.pending(), 0);
        assert_eq!(r.stats.dropped_incomplete, 1);
        // Duplicates are harmless.
        let e = fragment(1, 7, &packet(1500), 1000).unwrap();
        let mut out = Vec::new();
        for d in [&e[0], &e[0], &e[1], &e[1]] {
            let (h, p) = parse(d).unwrap();
            out.extend(r.push(now, 1, &h, p));
        }
        assert_eq!(out, vec![packet(1500)]);
    }
}
