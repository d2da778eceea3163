//! An RFC 4787 NAT: mapping and filtering behaviour, mapping timeout,
//! rebinding.
//!
//! The model, chosen to be the conservative one that conntrack-based NATs
//! (Linux netfilter, cloud NAT gateways) implement:
//! - A *binding* maps an internal endpoint to an external port. Which
//!   destinations share a binding is the mapping behaviour: all of them
//!   (endpoint-independent), those with the same IP address
//!   (address-dependent), or exactly one endpoint
//!   (address-and-port-dependent). New ports are random (no port
//!   preservation, no predictable sequence).
//! - Filtering is per binding: an inbound packet to a binding's external port
//!   passes if the binding is endpoint-independent-filtering, or if *that
//!   binding* has sent to the source's IP address (address-dependent) or to
//!   the source's exact endpoint (address-and-port-dependent) within the
//!   timeout.
//! - Only outbound packets refresh a binding and its permissions (RFC 4787
//!   makes inbound refresh optional; assuming it would hide keepalive bugs).
//!   A binding idle for `timeout` disappears.
//! - Rebinding (router restart, conntrack flush) forgets every binding; later
//!   packets get fresh random ports.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Which destinations share a mapping (RFC 4787 §4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Mapping {
    /// EIM: one external port per internal endpoint ("cone").
    EndpointIndependent,
    /// ADM: one per internal endpoint and destination IP.
    AddressDependent,
    /// APDM: one per internal endpoint and destination endpoint ("symmetric").
    AddressAndPortDependent,
}

/// Which inbound packets a mapping lets in (RFC 4787 §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Filtering {
    /// EIF: anything ("full cone").
    EndpointIndependent,
    /// ADF: from an IP address the mapping has sent to ("restricted cone").
    AddressDependent,
    /// APDF: from an endpoint the mapping has sent to ("port-restricted").
    AddressAndPortDependent,
}

impl Mapping {
    pub(crate) const ALL: [Mapping; 3] = [
        Mapping::EndpointIndependent,
        Mapping::AddressDependent,
        Mapping::AddressAndPortDependent,
    ];

    pub(crate) fn short(self) -> &'static str {
        match self {
            Mapping::EndpointIndependent => "EIM",
            Mapping::AddressDependent => "ADM",
            Mapping::AddressAndPortDependent => "APDM",
        }
    }
}

impl Filtering {
    pub(crate) const ALL: [Filtering; 3] = [
        Filtering::EndpointIndependent,
        Filtering::AddressDependent,
        Filtering::AddressAndPortDependent,
    ];

    pub(crate) fn short(self) -> &'static str {
        match self {
            Filtering::EndpointIndependent => "EIF",
            Filtering::AddressDependent => "ADF",
            Filtering::AddressAndPortDependent => "APDF",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Key {
    Any,
    Ip(IpAddr),
    Endpoint(SocketAddr),
}

#[derive(Debug)]
struct Binding {
    internal: SocketAddr,
    key: Key,
    port: u16,
    last_out: Instant,
    /// Destinations this binding sent to, and when last.
    permissions: Vec<(SocketAddr, Instant)>,
}

#[derive(Debug)]
pub(crate) struct Nat {
    pub(crate) mapping: Mapping,
    pub(crate) filtering: Filtering,
    pub(crate) external_ip: IpAddr,
    pub(crate) timeout: Duration,
    bindings: Vec<Binding>,
    rng: StdRng,
    /// Inbound packets dropped by filtering or for lack of a binding.
    pub(crate) dropped: u64,
}

impl Nat {
    pub(crate) fn new(
        mapping: Mapping,
        filtering: Filtering,
        external_ip: IpAddr,
        timeout: Duration,
        seed: u64,
    ) -> Self {
        Self {
            mapping,
            filtering,
            external_ip,
            timeout,
            bindings: Vec::new(),
            rng: StdRng::seed_from_u64(seed),
            dropped: 0,
        }
    }

    /// Translates an outbound packet; returns its external source address.
    pub(crate) fn outbound(
        &mut self,
        now: Instant,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> SocketAddr {
        self.expire(now);
        let key = match self.mapping {
            Mapping::EndpointIndependent => Key::Any,
            Mapping::AddressDependent => Key::Ip(dst.ip()),
            Mapping::AddressAndPortDependent => Key::Endpoint(dst),
        };
        let i = match self
            .bindings
            .iter()
            .position(|b| b.internal == src && b.key == key)
        {
            Some(i) => i,
            None => {
                let port = loop {
                    let port = self.rng.gen_range(1024..=65535);
                    if !self.bindings.iter().any(|b| b.port == port) {
                        break port;
                    }
                };
                self.bindings.push(Binding {
                    internal: src,
                    key,
                    port,
                    last_out: now,
                    permissions: Vec::new(),
                });
                self.bindings.len() - 1
            }
        };
        let b = &mut self.bindings[i];
        b.last_out = now;
        match b.permissions.iter_mut().find(|(p, _)| *p == dst) {
            Some(p) => p.1 = now,
            None => b.permissions.push((dst, now)),
        }
        SocketAddr::new(self.external_ip, b.port)
    }

    /// Filters and translates an inbound packet from `src` to our external
    /// `port`; returns the internal destination, or `None` if dropped.
    pub(crate) fn inbound(
        &mut self,
        now: Instant,
        src: SocketAddr,
        port: u16,
    ) -> Option<SocketAddr> {
        self.expire(now);
        let timeout = self.timeout;
        let live = |t: &Instant| now.saturating_duration_since(*t) <= timeout;
        let allowed = self.bindings.iter().find(|b| b.port == port).and_then(|b| {
            let ok = match self.filtering {
                Filtering::EndpointIndependent => true,
                Filtering::AddressDependent => b
                    .permissions
                    .iter()
                    .any(|(p, t)| p.ip() == src.ip() && live(t)),
                Filtering::AddressAndPortDependent => {
                    b.permissions.iter().any(|(p, t)| *p == src && live(t))
                }
            };
            ok.then_some(b.internal)
        });
        if allowed.is_none() {
            self.dropped += 1;
        }
        allowed
    }

    /// Forgets every binding (router restart, conntrack flush).
    pub(crate) fn rebind(&mut self) {
        self.bindings.clear();
    }

    /// External ports currently bound.
    pub(crate) fn ports(&self) -> Vec<u16> {
        self.bindings.iter().map(|b| b.port).collect()
    }

    fn expire(&mut self, now: Instant) {
        let timeout = self.timeout;
        self.bindings
            .retain(|b| now.saturating_duration_since(b.last_out) <= timeout);
        for b in &mut self.bindings {
            b.permissions
                .retain(|(_, t)| now.saturating_duration_since(*t) <= timeout);
        }
    }
}
