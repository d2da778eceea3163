//! The rendezvous: a QUIC service that sites dial out to. It authenticates
//! both ends, introduces sites that list each other, reflects addresses
//! (a STUN responder on UDP), and relays WireGuard ciphertext between sites
//! that have no direct path.
//!
//! - [`serve`] / [`RendezvousServer`]: the server (`causeway rendezvous`),
//!   configured by [`ServerConfig`].
//! - [`Registry`]: who is registered and introduced to whom, without I/O
//!   (the server's core; public so that simulators drive the real thing).
//! - [`RendezvousClient`]: a site's connection to one rendezvous, kept up
//!   with reconnects; yields [`RendezvousEvent`]s (peer updates, relayed
//!   packets).
//!
//! The protocol (messages and framing, authentication, relay datagrams,
//! who is introduced to whom, the site's session with its reconnects) is
//! sans-IO in private modules; the quinn drivers around it are thin. The construction and the threat model are in
//! docs/rendezvous.md.
//!
//! What it does not do: hole punching and path selection (the daemon's job,
//! with the candidates this exchanges), DNS resolution of the rendezvous
//! address (the caller passes a socket address), and anything with
//! plaintext: the relay carries only WireGuard ciphertext.

mod auth;
mod client;
mod config;
mod limits;
pub(crate) mod proto;
mod registry;
pub(crate) mod relay;
mod relay_port;
mod server;
mod session;
mod stream;
pub(crate) mod tcp;
#[cfg(test)]
mod tests;
mod tls;

pub use causeway_common::keys::KeyError;
pub use client::{RendezvousAddr, RendezvousClient, RendezvousHandle};
pub use config::{
    ConfigErrors, DEFAULT_LISTEN, DEFAULT_PRIVATE_KEY_FILE, DEFAULT_STUN_LISTEN, RelayPorts,
    ServerConfig, SiteEntry,
};
pub use proto::CloseCode;
pub use registry::{
    ConnId, PairKey, Registry, RelayCounters, RelayGrant, RelayRequest, RouteError, SiteKey, Update,
};
pub use relay::FragmentError;
pub use server::{AbuseCounters, RendezvousServer, ServeError, ServerStats, SiteStats, serve};
pub use session::{ClientStats, ConnectError, RelayError, RendezvousEvent};
pub use tls::TlsError;

/// The default QUIC port of a rendezvous.
pub const DEFAULT_PORT: u16 = 7443;
/// The default STUN port of a rendezvous.
pub const DEFAULT_STUN_PORT: u16 = 3478;
/// The default TLS-over-TCP port of a rendezvous (HTTPS', which egress
/// firewalls let out).
pub const DEFAULT_TCP_PORT: u16 = 443;
