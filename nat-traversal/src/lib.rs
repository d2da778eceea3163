//! NAT traversal for Causeway.
//!
//! [`rendezvous`]: the QUIC rendezvous service and its site client
//! (mutual authentication bound to the TLS session, introductions of sites
//! that list each other, STUN responder, relay of WireGuard ciphertext);
//! see docs/rendezvous.md.
//!
//! Hole punching, without I/O (the driver owns the socket and the clock;
//! docs/nat-traversal.md describes formats, rules and timers):
//! - [`stun`]: RFC 8489 Binding requests and responses (server-reflexive
//!   address of the WireGuard socket; the responder side for the rendezvous).
//! - [`probe`]: authenticated path probes (ping/pong, keyed by the two sites'
//!   WireGuard keys) that share the WireGuard socket with WireGuard and STUN.
//! - [`path`]: per-peer candidate probing and path selection (`PeerPaths`):
//!   direct path or relay, keepalives, dead-path detection.
//! - [`portmap`]: PCP (RFC 6887) and NAT-PMP (RFC 6886) codec and client:
//!   a port mapping of the WireGuard port on the gateway's router.
//! - [`udp_relay`]: the UDP relay's bind/ack messages and its per-port
//!   forwarding decision (what the rendezvous' relay ports run).

pub mod path;
pub mod portmap;
pub mod probe;
pub mod rendezvous;
pub mod stun;
pub mod udp_relay;

#[doc(hidden)]
pub mod fuzz;
