//! Packet operations of the data path: parse, remap, MSS clamp, ICMP "too
//! big" generation and the allow-list check.
//!
//! Everything here is a pure function over one raw IPv4 or IPv6 packet in a
//! byte buffer (no link-layer header, as read from the TUN): no I/O, no
//! clock, no allocation, and no panic on any input. Rewrites happen in
//! place and fix checksums incrementally (RFC 1624). A packet that cannot
//! be parsed gets a [`PacketError`], one variant per drop reason.
//!
//! # Remapping
//!
//! [`View`] holds a peer's real CIDR and this site's view of it. Egress
//! to the peer rewrites the destination `view → real` ([`translate_dst`]),
//! ingress from the peer rewrites the source `real → view`
//! ([`translate_src`]): the prefix bits are replaced, the host bits kept
//! (NPTv6-style for IPv6, the same for IPv4), with no per-flow state.
//! ICMP and ICMPv6 errors have the packet they quote translated too (the
//! quoted source when the outer destination is translated and vice versa),
//! so traceroute and path-MTU discovery work across remapped sites.
//!
//! Limits, all deliberate:
//! - a later fragment only has its IP header rewritten; the first fragment's
//!   transport checksum change is valid for the whole datagram;
//! - a quote is only translated when the outer address was; it is
//!   translated one level deep, and only the bytes present in this packet
//!   (a quote cut by fragmentation keeps its later bytes as they were);
//! - a zero UDP checksum is left at zero for IPv6 as well as IPv4 (zero is
//!   invalid for IPv6 UDP outside tunnels, RFC 6935, and the receiver drops
//!   it either way);
//! - other transports are translated at the IP layer only: IPsec AH (which
//!   authenticates the addresses) breaks, and so would DCCP's checksum.
//!
//! # MTU
//!
//! [`clamp_mss`] lowers the MSS option of SYN and SYN-ACK segments to
//! [`max_mss`] of the tunnel MTU, in both directions. [`too_big_reply`]
//! builds the ICMP "fragmentation needed" (IPv4 with DF) or ICMPv6 "packet
//! too big" that the daemon sends back into the TUN for a packet too large
//! for the tunnel.
//!
//! # Policy: the stateless reply rule
//!
//! [`allowed`] checks a packet that came in from a peer, after translation,
//! against that peer's allow-list ([`AllowRule`]s). It keeps no state, so
//! it cannot know which flows the local pods opened. The rule is:
//!
//! > A packet from a peer is delivered if it matches one of the peer's
//! > allow rules (destination prefix, protocol, destination port).
//! > Without a matching rule, only packets that cannot open anything are
//! > delivered: TCP segments other than a bare SYN (a connection can only
//! > be opened with a SYN without ACK; a stray ACK or RST is answered or
//! > ignored by the pod's TCP stack), ICMP echo replies, ICMP errors about
//! > a flow (destination unreachable, packet too big / fragmentation
//! > needed, time exceeded, parameter problem), and non-first fragments.
//! > Everything else, in particular UDP and every other protocol, needs a
//! > rule, even when it is a reply to a flow a local pod opened: a
//! > stateless check cannot tell a UDP reply from a new UDP flow. A site
//! > whose pods query a peer over UDP (DNS, QUIC, …) must allow that
//! > peer's replies explicitly, e.g. by source port on its side, or
//! > accept that they are dropped.
//!
//! Consequences the operator should know:
//! - Non-first fragments are allowed without a check, because only the
//!   first fragment carries the ports. A denied first fragment means the
//!   datagram can never be reassembled; the later fragments only occupy the
//!   pod's reassembly queue until it times out (bounded by the kernel).
//!   Fragments that overlap the TCP header (RFC 1858) are rejected by
//!   [`parse()`] as [`PacketError::TinyFragment`], and an unfragmented packet
//!   or first fragment must hold its whole transport header.
//! - The reply rule looks at the packet's shape, not its destination: the
//!   daemon must deliver inbound packets only to local pod addresses, so
//!   that a TCP ACK or an echo reply cannot be aimed at anything else.
//! - An allowed TCP ACK towards a closed or unknown port draws a RST from
//!   the pod, exactly as on a flat network; it opens nothing.

mod checksum;
mod icmp;
mod mss;
mod parse;
mod policy;
mod translate;

pub use icmp::too_big_reply;
pub use mss::{clamp_mss, max_mss};
pub use parse::{
    Fragment, IpVersion, MAX_EXTENSION_HEADERS, PacketError, Summary, parse, tcp_flags,
};
pub use policy::{AllowReason, AllowRule, DenyReason, Proto, Verdict, allowed};
pub use translate::{View, ViewError, translate_dst, translate_src};

#[cfg(test)]
mod tests;
