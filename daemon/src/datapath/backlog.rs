//! The order in which decrypted packets go to the TUN (issue 13, part 4).
//!
//! Under a bulk transfer the receiving gateway has a standing queue of
//! ciphertext (about a megabyte, most of it in the UDP socket's receive
//! queue), and a small request behind it waited until all of it had been
//! decrypted *and written to the TUN*. Writing is the larger half of that
//! work (the TUN write runs the kernel's forwarding and the receiving
//! pod's TCP input). So the inbound thread now drains the socket and
//! decrypts first, keeps the decrypted bulk here, and writes it in chunks
//! between reads; a small packet whose flow has nothing held here goes to
//! the TUN at once, ahead of that bulk. Holding costs a copy of each bulk
//! packet, so the thread holds only while small packets are arriving
//! (`inbound::HOLD_FOR`).
//!
//! Decryption stays in arrival order (boringtun's replay window never sees
//! a jump), and no flow is reordered: a packet goes ahead only when no
//! earlier packet of its flow (5-tuple) is still held. A packet whose
//! ports cannot be read (fragments, unknown IPv6 extension headers,
//! unparsable) is held and holds back every small packet between the same
//! two addresses. A hash collision only holds a packet that could have
//! gone ahead.

/// Packets up to this size may go ahead of the held bulk: requests and
/// answers of a few bytes, TCP ACKs, DNS, pings. Bulk segments are close
/// to the MTU.
pub(super) const SMALL: usize = 256;

/// Distinct flows counted at once; more only make the backlog hold every
/// small packet until it is empty again (never a reordering).
const MAX_FLOWS: usize = 64;

/// Which flow a packet belongs to, as a hash (`Flow(0)` is never a key).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Flow(u64);

/// The keys of an inner packet: its 5-tuple (protocol and ports, 0 when
/// the protocol has none), and the pair of addresses, which is what a
/// packet whose ports cannot be read is held under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Keys {
    /// `None` when the ports (or the protocol) could not be read.
    five_tuple: Option<Flow>,
    hosts: Flow,
}

/// A cheap mix of the header words (the multiplier of FxHash): no
/// attacker gains anything from a collision but a packet held in order.
fn hash(words: &[u64]) -> Flow {
    let h = words.iter().fold(0u64, |h, &w| {
        (h.rotate_left(5) ^ w).wrapping_mul(0x517c_c1b7_2722_0a95)
    });
    Flow(h.max(1))
}

fn word(b: &[u8]) -> u64 {
    b.iter().fold(0u64, |w, &x| (w << 8) | u64::from(x))
}

/// The keys of `packet` (which the core has already parsed and checked),
/// read straight from the headers because this runs for every packet;
/// `None` when not even its addresses can be read (then it is held and
/// holds back every small packet).
fn keys(packet: &[u8]) -> Option<Keys> {
    const TCP: u8 = 6;
    const UDP: u8 = 17;
    const ICMPV6: u8 = 58;
    let (src, dst, proto, l4) = match packet.first()? >> 4 {
        4 => {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            // More-fragments flag or a fragment offset: ports unknown.
            let fragment = word(packet.get(6..8)?) & 0x3fff != 0;
            let proto = *packet.get(9)?;
            let l4 = (!fragment).then_some(ihl);
            (packet.get(12..16)?, packet.get(16..20)?, proto, l4)
        }
        6 => {
            // Only a transport header right after the fixed header is
            // read; extension headers count as unknown ports.
            let proto = *packet.get(6)?;
            let l4 = matches!(proto, TCP | UDP | ICMPV6).then_some(40);
            (packet.get(8..24)?, packet.get(24..40)?, proto, l4)
        }
        _ => return None,
    };
    let (s, d) = (src.chunks(8).map(word), dst.chunks(8).map(word));
    let mut words = [0u64; 6];
    let mut n = 0;
    for w in s.chain(d) {
        words[n] = w;
        n += 1;
    }
    let hosts = hash(&words[..n]);
    let five_tuple = match (proto, l4) {
        (TCP | UDP, Some(at)) => packet
            .get(at..at + 4)
            .map(|ports| hash(&[hosts.0, u64::from(proto), word(ports)])),
        // Other protocols (ICMP, ...): one flow per address pair and
        // protocol.
        (_, Some(_)) => Some(hash(&[hosts.0, u64::from(proto)])),
        (_, None) => None,
    };
    Some(Keys { five_tuple, hosts })
}

/// How many held packets each flow has.
#[derive(Default)]
struct FlowCounts {
    counts: Vec<(Flow, u32)>,
    /// Held packets whose flow did not fit in `counts`, or that have no
    /// key at all: while there are any, nothing goes ahead.
    uncounted: u32,
}

impl FlowCounts {
    fn add(&mut self, flow: Option<Flow>) {
        let Some(flow) = flow else {
            self.uncounted += 1;
            return;
        };
        if let Some((_, n)) = self.counts.iter_mut().find(|(f, _)| *f == flow) {
            *n += 1;
        } else if self.counts.len() < MAX_FLOWS {
            self.counts.push((flow, 1));
        } else {
            self.uncounted += 1;
        }
    }

    fn remove(&mut self, flow: Option<Flow>) {
        let found = flow.and_then(|flow| self.counts.iter().position(|(f, _)| *f == flow));
        match found {
            Some(i) => {
                self.counts[i].1 -= 1;
                if self.counts[i].1 == 0 {
                    self.counts.swap_remove(i);
                }
            }
            None => self.uncounted = self.uncounted.saturating_sub(1),
        }
    }

    fn holds(&self, flow: Flow) -> bool {
        self.uncounted > 0 || self.counts.iter().any(|(f, _)| *f == flow)
    }
}

/// Decrypted packets not yet written to the TUN, oldest first, in a ring
/// of fixed-size slots (no allocation per packet).
pub(super) struct Backlog {
    arena: Vec<u8>,
    slot: usize,
    /// Per slot: the packet's length and the key it is counted under.
    held: Vec<(usize, Option<Flow>)>,
    head: usize,
    len: usize,
    flows: FlowCounts,
}

impl Backlog {
    /// Room for `capacity` packets of up to `slot` bytes.
    pub(super) fn new(capacity: usize, slot: usize) -> Self {
        let capacity = capacity.max(1);
        Backlog {
            arena: vec![0; capacity * slot],
            slot,
            held: vec![(0, None); capacity],
            head: 0,
            len: 0,
            flows: FlowCounts::default(),
        }
    }

    /// The largest packet (and datagram) a slot takes.
    pub(super) fn slot_len(&self) -> usize {
        self.slot
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(super) fn is_full(&self) -> bool {
        self.len == self.held.len()
    }

    /// Where the next packet is to be decrypted (the backlog must not be
    /// full).
    pub(super) fn next_slot(&mut self) -> &mut [u8] {
        let i = (self.head + self.len) % self.held.len();
        &mut self.arena[i * self.slot..(i + 1) * self.slot]
    }

    /// Takes the `len`-byte packet just decrypted into [`Self::next_slot`].
    /// Returns it when it may go to the TUN now, ahead of what is held (it
    /// is small, and nothing of its flow is held); otherwise it is held
    /// behind the others and `None` is returned.
    pub(super) fn admit(&mut self, len: usize) -> Option<&[u8]> {
        let i = (self.head + self.len) % self.held.len();
        let start = i * self.slot;
        let packet = &self.arena[start..start + len.min(self.slot)];
        let keys = keys(packet);
        let ahead = len <= SMALL
            && keys.is_some_and(|k| {
                k.five_tuple
                    .is_some_and(|f| !self.flows.holds(f) && !self.flows.holds(k.hosts))
            });
        if ahead {
            return Some(packet);
        }
        // Counted under its 5-tuple, or under the address pair when it has
        // none (then it holds back every small packet between the two).
        let key = keys.map(|k| k.five_tuple.unwrap_or(k.hosts));
        self.flows.add(key);
        self.held[i] = (len.min(self.slot), key);
        self.len += 1;
        None
    }

    /// The oldest held packet, which the caller writes out next.
    pub(super) fn pop(&mut self) -> Option<&[u8]> {
        if self.len == 0 {
            return None;
        }
        let i = self.head;
        let (len, key) = self.held[i];
        self.flows.remove(key);
        self.head = (self.head + 1) % self.held.len();
        self.len -= 1;
        Some(&self.arena[i * self.slot..i * self.slot + len])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 TCP or UDP packet of `len` bytes from port `sport` to 80
    /// (no checksum: nothing here reads it); `tag` is written into the
    /// payload's first byte to follow the packet.
    fn v4(proto: u8, sport: u16, len: usize, tag: u8) -> Vec<u8> {
        assert!(len > 40, "room for the headers and the tag");
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[8] = 64;
        p[9] = proto;
        p[12..16].copy_from_slice(&[10, 1, 0, 2]);
        p[16..20].copy_from_slice(&[10, 2, 0, 2]);
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&80u16.to_be_bytes());
        if proto == 6 {
            p[32] = 5 << 4; // data offset
            p[40] = tag;
        } else {
            p[24..26].copy_from_slice(&((len - 20) as u16).to_be_bytes());
            p[28] = tag;
        }
        p
    }

    fn tag(packet: &[u8]) -> u8 {
        if packet[9] == 6 {
            packet[40]
        } else {
            packet[28]
        }
    }

    /// Puts `packets` through a backlog as the inbound thread does, writing
    /// `chunk` held packets after every `every` admitted ones; returns the
    /// tags in the order they reached the "TUN".
    fn run(packets: &[Vec<u8>], every: usize, chunk: usize) -> Vec<u8> {
        let mut b = Backlog::new(16, 1600);
        let mut out = Vec::new();
        for (n, p) in packets.iter().enumerate() {
            b.next_slot()[..p.len()].copy_from_slice(p);
            if let Some(p) = b.admit(p.len()) {
                out.push(tag(p));
            }
            if (n + 1) % every == 0 {
                for _ in 0..chunk {
                    if let Some(p) = b.pop() {
                        out.push(tag(p));
                    }
                }
            }
        }
        while let Some(p) = b.pop() {
            out.push(tag(p));
        }
        out
    }

    #[test]
    fn a_small_packet_of_an_idle_flow_goes_ahead_of_the_bulk() {
        // Bulk on port 1000 (tags 1-4), a request on port 2000 (tag 9).
        let packets = [
            v4(6, 1000, 1400, 1),
            v4(6, 1000, 1400, 2),
            v4(6, 1000, 1400, 3),
            v4(6, 2000, 100, 9),
            v4(6, 1000, 1400, 4),
        ];
        assert_eq!(run(&packets, 100, 0), [9, 1, 2, 3, 4]);
    }

    #[test]
    fn a_small_packet_never_overtakes_its_own_flow() {
        // A short tail and a FIN-sized segment of the bulk flow stay
        // behind its earlier segments; UDP likewise.
        let packets = [
            v4(6, 1000, 1400, 1),
            v4(6, 1000, 1400, 2),
            v4(6, 1000, 60, 3),
            v4(6, 1000, 52, 4),
            v4(17, 1000, 1400, 5),
            v4(17, 1000, 80, 6),
        ];
        assert_eq!(run(&packets, 100, 0), [1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn a_flow_goes_ahead_again_once_its_held_packets_are_written() {
        let packets = [
            v4(6, 1000, 1400, 1),
            v4(6, 1000, 52, 2),
            // Both written after these two (chunk of 2 after 2 packets).
            v4(6, 3000, 1400, 3),
            v4(6, 1000, 52, 4),
        ];
        assert_eq!(run(&packets, 2, 2), [1, 2, 4, 3]);
    }

    #[test]
    fn per_flow_order_holds_for_any_mix() {
        // Many flows, sizes and write schedules: within each flow the tags
        // come out in the order they went in, and every packet comes out
        // once.
        let mut seed = 0x2545_f491_u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for round in 0..200 {
            let packets: Vec<Vec<u8>> = (0..12u8)
                .map(|t| {
                    let r = next();
                    let proto = if r & 1 == 0 { 6 } else { 17 };
                    let port = 1000 + (r >> 1) as u16 % 3;
                    let len = if r & 0x30 == 0 {
                        1400
                    } else {
                        64 + (r >> 8) as usize % 150
                    };
                    v4(proto, port, len, t)
                })
                .collect();
            let out = run(&packets, 1 + round % 5, round % 4);
            let mut sorted = out.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..12).collect::<Vec<u8>>(), "round {round}");
            for (i, a) in packets.iter().enumerate() {
                for b in &packets[i + 1..] {
                    if a[9] == b[9] && a[20..22] == b[20..22] {
                        let pos = |t| out.iter().position(|&x| x == t);
                        assert!(pos(tag(a)) < pos(tag(b)), "round {round}: {out:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn unparsable_and_fragmented_packets_hold_back_their_hosts() {
        // A later fragment (offset 8) of a datagram between the two hosts:
        // held under the address pair, so a small TCP packet between the
        // same hosts waits, as does anything after an unreadable packet.
        let mut fragment = v4(17, 1000, 300, 1);
        fragment[6..8].copy_from_slice(&1u16.to_be_bytes());
        let packets = [fragment, v4(6, 2000, 100, 2)];
        assert_eq!(run(&packets, 100, 0), [1, 2]);

        let garbage = vec![0u8; 100];
        let mut b = Backlog::new(4, 1600);
        b.next_slot()[..100].copy_from_slice(&garbage);
        assert!(b.admit(100).is_none());
        let p = v4(6, 2000, 100, 2);
        b.next_slot()[..p.len()].copy_from_slice(&p);
        assert!(b.admit(p.len()).is_none(), "held behind the unreadable one");
        assert!(b.pop().is_some_and(|p| p == &garbage[..]));
        assert!(b.pop().is_some_and(|q| q == &p[..]));
        assert!(b.is_empty());
        // With nothing held, it goes ahead.
        b.next_slot()[..p.len()].copy_from_slice(&p);
        assert!(b.admit(p.len()).is_some());
    }

    #[test]
    fn too_many_flows_hold_everything_rather_than_forget_one() {
        let mut b = Backlog::new(MAX_FLOWS + 2, 1600);
        for port in 0..=MAX_FLOWS as u16 {
            let p = v4(6, 1000 + port, 1400, 0);
            b.next_slot()[..p.len()].copy_from_slice(&p);
            assert!(b.admit(p.len()).is_none());
        }
        let small = v4(6, 5000, 60, 0);
        b.next_slot()[..small.len()].copy_from_slice(&small);
        assert!(b.admit(small.len()).is_none());
        assert_eq!(b.len(), MAX_FLOWS + 2);
        assert!(b.is_full());
    }
}
