//! The UDP relay, without I/O: the bind and ack messages a site exchanges
//! with its relay port, and [`RelayPair`], the rendezvous' decision for
//! each datagram that reaches one.
//!
//! The rendezvous gives each pair of mutual sites that asks for it a UDP
//! port of its own (a *relay port*) and each of the two sites a random
//! 32-byte token for it, over the authenticated control stream. A site
//! *binds* its WireGuard socket to the port by sending a bind MAC'd with
//! its token; the source address of the latest valid bind is where the
//! port sends that site's traffic. Every other datagram from a bound
//! address is forwarded, unchanged, to the other site's bound address;
//! datagrams from any other address are dropped. So the port forwards
//! between exactly two addresses, each proven by a token that only the
//! rendezvous and that site know, and it never looks inside what it
//! forwards (WireGuard ciphertext).
//!
//! Wire format of the control messages (30 bytes, integers big-endian):
//!
//! ```text
//!  0        4    5              13     14                     30
//!  +--------+----+--------------+------+----------------------+
//!  | magic  |kind| counter      | flag | MAC (16)             |
//!  | CA 63  | 1  | u64          | 0    |                      |
//!  | 77 10  | 2  |              | 0|1  |                      |
//!  +--------+----+--------------+------+----------------------+
//!  kind 1 = bind (site → port), 2 = ack (port → site; flag 1: the other
//!  site is bound too, so traffic can flow both ways)
//! ```
//!
//! MAC = BLAKE2s keyed with the site's token, 16-byte output, over the
//! first 14 bytes. A bind's counter must be higher than the last one the
//! port accepted from that site, so a captured bind cannot be replayed to
//! move the site's address; an ack echoes the bind's counter. The first
//! byte, 0xCA, has its top bit set like a path probe's (whose fourth byte
//! is 0x02): a control message is neither WireGuard, nor STUN, nor a probe.

use std::fmt;
use std::net::SocketAddr;

use blake2::Blake2sMac;
use blake2::digest::consts::U16;
use blake2::digest::{KeyInit, Mac};
use rand::RngCore;

/// The first four bytes of every bind and ack.
pub const MAGIC: [u8; 4] = [0xCA, b'c', b'w', 0x10];
/// Length of a bind or an ack.
pub const CONTROL_LEN: usize = 30;

const KIND_BIND: u8 = 1;
const KIND_ACK: u8 = 2;
const MAC_AT: usize = 14;

/// A site's secret for one relay port.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RelayToken(pub [u8; 32]);

impl fmt::Debug for RelayToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RelayToken(..)")
    }
}

impl RelayToken {
    /// A fresh random token.
    pub fn random(rng: &mut impl RngCore) -> Self {
        let mut token = [0u8; 32];
        rng.fill_bytes(&mut token);
        RelayToken(token)
    }

    fn mac(&self, head: &[u8]) -> [u8; 16] {
        let mut mac = <Blake2sMac<U16> as KeyInit>::new(&self.0.into());
        Mac::update(&mut mac, head);
        mac.finalize().into_bytes().into()
    }

    fn encode(&self, kind: u8, counter: u64, flag: bool) -> [u8; CONTROL_LEN] {
        let mut out = [0u8; CONTROL_LEN];
        out[..4].copy_from_slice(&MAGIC);
        out[4] = kind;
        out[5..13].copy_from_slice(&counter.to_be_bytes());
        out[13] = u8::from(flag);
        let mac = self.mac(&out[..MAC_AT]);
        out[MAC_AT..].copy_from_slice(&mac);
        out
    }

    fn open(&self, kind: u8, datagram: &[u8]) -> Option<(u64, bool)> {
        if !is_control(datagram) || datagram[4] != kind || datagram[13] > 1 {
            return None;
        }
        let mut mac = <Blake2sMac<U16> as KeyInit>::new(&self.0.into());
        Mac::update(&mut mac, &datagram[..MAC_AT]);
        mac.verify_slice(&datagram[MAC_AT..]).ok()?;
        let counter = u64::from_be_bytes(datagram[5..13].try_into().ok()?);
        Some((counter, datagram[13] == 1))
    }

    /// A bind with `counter` (strictly increasing per token).
    pub fn bind(&self, counter: u64) -> [u8; CONTROL_LEN] {
        self.encode(KIND_BIND, counter, false)
    }

    /// The port's answer to the bind with `counter`.
    pub fn ack(&self, counter: u64, peer_bound: bool) -> [u8; CONTROL_LEN] {
        self.encode(KIND_ACK, counter, peer_bound)
    }

    /// The counter of a valid bind made with this token.
    pub fn open_bind(&self, datagram: &[u8]) -> Option<u64> {
        self.open(KIND_BIND, datagram).map(|(counter, _)| counter)
    }

    /// The counter and flag of a valid ack for this token.
    pub fn open_ack(&self, datagram: &[u8]) -> Option<(u64, bool)> {
        self.open(KIND_ACK, datagram)
    }
}

/// A relay port granted to this site for one peer: where to bind, and
/// with which token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayPort {
    /// The port on the rendezvous' address.
    pub addr: SocketAddr,
    /// This site's token for it.
    pub token: RelayToken,
}

/// Whether a datagram has the shape of a bind or an ack (not whether it
/// is valid).
pub fn is_control(datagram: &[u8]) -> bool {
    datagram.len() == CONTROL_LEN && datagram[..4] == MAGIC
}

/// One side of a relay port.
#[derive(Debug, Clone, Copy)]
struct Side {
    token: RelayToken,
    /// Source of the latest valid bind.
    addr: Option<SocketAddr>,
    /// Counter of that bind.
    counter: u64,
}

/// What to do with a datagram that reached a relay port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Forward it unchanged to this address; it came from `from_side`
    /// (0 or 1).
    Forward {
        /// The other site's bound address.
        to: SocketAddr,
        /// Which side sent it.
        from_side: usize,
    },
    /// A valid bind: send this ack back to its source.
    Ack([u8; CONTROL_LEN]),
    /// Drop it: from an address that is not bound, to a side not bound
    /// yet, or a control message that does not verify (or replays).
    Drop(DropCause),
}

/// Why a relay port dropped a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropCause {
    /// The source is neither site's bound address.
    Stranger,
    /// The other site has not bound yet.
    PeerUnbound,
    /// A bind or ack that does not verify, or a replayed bind.
    BadControl,
}

/// The two sides of one relay port: their tokens and bound addresses.
#[derive(Debug, Clone)]
pub struct RelayPair {
    sides: [Side; 2],
}

impl RelayPair {
    /// A port for two sites with these tokens (in the order the
    /// rendezvous names the sites).
    pub fn new(tokens: [RelayToken; 2]) -> Self {
        let side = |token| Side {
            token,
            addr: None,
            counter: 0,
        };
        RelayPair {
            sides: [side(tokens[0]), side(tokens[1])],
        }
    }

    /// The bound address of a side.
    pub fn addr(&self, side: usize) -> Option<SocketAddr> {
        self.sides.get(side).and_then(|s| s.addr)
    }

    /// The fast path: where a datagram from `from` goes, when `from` is a
    /// bound side and the other side is bound too. `None` for everything
    /// else (control messages, strangers, an unbound peer): ask
    /// [`Self::handle`].
    pub fn route(&self, from: SocketAddr) -> Option<(SocketAddr, usize)> {
        let i = self.sides.iter().position(|s| s.addr == Some(from))?;
        Some((self.sides[1 - i].addr?, i))
    }

    /// Decides about one datagram from `from`.
    pub fn handle(&mut self, from: SocketAddr, datagram: &[u8]) -> Verdict {
        if is_control(datagram) {
            return self.control(from, datagram);
        }
        match self.route(from) {
            Some((to, from_side)) => Verdict::Forward { to, from_side },
            None if self.sides.iter().any(|s| s.addr == Some(from)) => {
                Verdict::Drop(DropCause::PeerUnbound)
            }
            None => Verdict::Drop(DropCause::Stranger),
        }
    }

    fn control(&mut self, from: SocketAddr, datagram: &[u8]) -> Verdict {
        for i in 0..2 {
            let peer_bound = self.sides[1 - i].addr.is_some();
            let side = &mut self.sides[i];
            let Some(counter) = side.token.open_bind(datagram) else {
                continue;
            };
            if counter <= side.counter {
                return Verdict::Drop(DropCause::BadControl);
            }
            side.counter = counter;
            side.addr = Some(from);
            return Verdict::Ack(side.token.ack(counter, peer_bound));
        }
        Verdict::Drop(DropCause::BadControl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (RelayPair, RelayToken, RelayToken) {
        let (a, b) = (RelayToken([1; 32]), RelayToken([2; 32]));
        (RelayPair::new([a, b]), a, b)
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn binds_are_acked_and_traffic_flows_only_between_the_bound_addresses() {
        let (mut port, a, b) = pair();
        let (at_a, at_b, stranger) = (
            addr("192.0.2.1:1000"),
            addr("198.51.100.2:2000"),
            addr("203.0.113.3:3000"),
        );
        let data = [4u8, 0, 0, 0, 9, 9, 9];
        assert_eq!(port.handle(at_a, &data), Verdict::Drop(DropCause::Stranger));
        let Verdict::Ack(ack) = port.handle(at_a, &a.bind(1)) else {
            panic!("no ack")
        };
        assert_eq!(a.open_ack(&ack), Some((1, false)), "b is not bound yet");
        assert_eq!(b.open_ack(&ack), None, "an ack is for its own token only");
        assert_eq!(
            port.handle(at_a, &data),
            Verdict::Drop(DropCause::PeerUnbound)
        );
        let Verdict::Ack(ack) = port.handle(at_b, &b.bind(7)) else {
            panic!("no ack")
        };
        assert_eq!(b.open_ack(&ack), Some((7, true)));
        assert_eq!(
            port.handle(at_a, &data),
            Verdict::Forward {
                to: at_b,
                from_side: 0
            }
        );
        assert_eq!(
            port.handle(at_b, &data),
            Verdict::Forward {
                to: at_a,
                from_side: 1
            }
        );
        assert_eq!(port.route(at_a), Some((at_b, 0)));
        assert_eq!(
            port.handle(stranger, &data),
            Verdict::Drop(DropCause::Stranger)
        );
    }

    #[test]
    fn a_replayed_or_forged_bind_moves_nothing() {
        let (mut port, a, _) = pair();
        let (at_a, thief) = (addr("192.0.2.1:1000"), addr("203.0.113.3:3000"));
        let bind = a.bind(5);
        assert!(matches!(port.handle(at_a, &bind), Verdict::Ack(_)));
        assert_eq!(
            port.handle(thief, &bind),
            Verdict::Drop(DropCause::BadControl)
        );
        assert_eq!(
            port.handle(thief, &a.bind(4)),
            Verdict::Drop(DropCause::BadControl)
        );
        let forged = RelayToken([9; 32]).bind(100);
        assert_eq!(
            port.handle(thief, &forged),
            Verdict::Drop(DropCause::BadControl)
        );
        let mut flipped = a.bind(6);
        flipped[13] = 1;
        assert_eq!(
            port.handle(thief, &flipped),
            Verdict::Drop(DropCause::BadControl)
        );
        assert_eq!(port.addr(0), Some(at_a));
        // The site itself moves (its NAT mapping changed) with a newer bind.
        let moved = addr("192.0.2.1:1001");
        assert!(matches!(port.handle(moved, &a.bind(6)), Verdict::Ack(_)));
        assert_eq!(port.addr(0), Some(moved));
    }

    #[test]
    fn control_messages_are_none_of_the_other_shapes() {
        let bind = RelayToken([3; 32]).bind(1);
        assert!(is_control(&bind));
        assert!(!crate::probe::is_probe(&bind));
        assert!(!crate::stun::is_stun(&bind));
        assert!(!is_control(&bind[..29]));
        assert_eq!(
            RelayToken([3; 32]).open_ack(&bind),
            None,
            "a bind is no ack"
        );
    }
}
