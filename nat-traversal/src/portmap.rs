//! Port mapping on the gateway's router with PCP (RFC 6887) or NAT-PMP
//! (RFC 6886), without I/O.
//!
//! A router that offers either can be asked to forward an external UDP port
//! to the WireGuard port: that external `address:port` is then a candidate
//! every peer can reach, whatever NAT the peer itself is behind.
//!
//! - The codec: [`encode_pcp_map`], [`encode_natpmp_address`],
//!   [`encode_natpmp_map`] and [`parse`] (responses only: we are a client).
//! - [`PortMapper`]: one mapping of one internal UDP port. It tries PCP
//!   first and falls back to NAT-PMP when the server answers PCP with
//!   `UNSUPP_VERSION` or with a NAT-PMP (version 0) message, or does not
//!   answer PCP at all. Requests are retransmitted after 250 ms, doubling up
//!   to 4 s; a round unanswered after that gives up quietly and the next one
//!   starts [`MapperConfig::retry_interval`] later (most routers have
//!   neither protocol). A mapping is renewed at half its lifetime. The
//!   driver owns the socket (connected to the gateway's port
//!   [`SERVER_PORT`], so only the gateway can answer) and the clock.
//!
//! Unsolicited announcements (multicast to port 5350) are not listened to:
//! the renewal at half the lifetime recreates a mapping a rebooted router
//! lost.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4};
use std::time::{Duration, Instant};

/// The UDP port PCP and NAT-PMP servers listen on (RFC 6887 §19.1,
/// RFC 6886 §3.1).
pub const SERVER_PORT: u16 = 5351;

/// The PCP version (RFC 6887).
pub const PCP_VERSION: u8 = 2;
/// The NAT-PMP version (RFC 6886); PCP servers answer it too.
pub const NATPMP_VERSION: u8 = 0;

/// PCP opcode MAP.
const PCP_OP_MAP: u8 = 1;
/// The R bit of a PCP opcode byte: a response.
const PCP_RESPONSE: u8 = 0x80;
/// PCP common header length (request and response).
const PCP_HEADER_LEN: usize = 24;
/// PCP MAP opcode payload length.
const PCP_MAP_LEN: usize = 36;
/// A PCP MAP request or response without options.
pub const PCP_MAP_MESSAGE_LEN: usize = PCP_HEADER_LEN + PCP_MAP_LEN;
/// The largest PCP message (RFC 6887 §7).
const PCP_MAX_LEN: usize = 1100;
/// IANA protocol number of UDP.
const PROTO_UDP: u8 = 17;

/// NAT-PMP opcode: external address request.
const NATPMP_OP_ADDRESS: u8 = 0;
/// NAT-PMP opcode: map a UDP port.
const NATPMP_OP_MAP_UDP: u8 = 1;
/// NAT-PMP responses: the request opcode plus 128.
const NATPMP_RESPONSE: u8 = 128;
/// A NAT-PMP external address response.
const NATPMP_ADDRESS_RESPONSE_LEN: usize = 12;
/// A NAT-PMP mapping response.
const NATPMP_MAP_RESPONSE_LEN: usize = 16;
/// A NAT-PMP error response carries at least version, opcode, result, epoch.
const NATPMP_ERROR_LEN: usize = 8;

/// Result code 1: the server does not speak this version (the same number
/// in both protocols).
pub const RESULT_UNSUPPORTED_VERSION: u16 = 1;

/// The lifetime asked for (two hours, RFC 6886's recommendation).
pub const DEFAULT_LIFETIME: u32 = 7200;

/// First retransmission; each next one waits twice as long, up to
/// [`LAST_RTO`], after which the round gives up.
const FIRST_RTO: Duration = Duration::from_millis(250);
/// The last wait of a round.
const LAST_RTO: Duration = Duration::from_secs(4);

/// Which protocol a request or answer speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// Port Control Protocol, RFC 6887.
    Pcp,
    /// NAT Port Mapping Protocol, RFC 6886.
    NatPmp,
}

impl Protocol {
    /// `"pcp"` or `"nat-pmp"`.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Pcp => "pcp",
            Protocol::NatPmp => "nat-pmp",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The PCP mapping nonce of a site: derived from its private key and the
/// internal port, so that a restarted daemon (after a crash, with its old
/// mapping still on the router) renews that mapping instead of being
/// refused as another client (RFC 6887 §11.3 ties a mapping to its nonce).
/// It reveals nothing about the key: a keyed BLAKE2s hash, cut to 96 bits.
pub fn site_nonce(private_key: &[u8; 32], internal_port: u16) -> [u8; 12] {
    use blake2::digest::{KeyInit, Mac};
    let mut mac = <blake2::Blake2sMac256 as KeyInit>::new(private_key.into());
    mac.update(b"causeway pcp nonce");
    mac.update(&internal_port.to_be_bytes());
    let tag = mac.finalize().into_bytes();
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&tag[..12]);
    nonce
}

/// A PCP MAP request for UDP (RFC 6887 §11.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PcpMapRequest {
    /// The client's own address as the server sees it (the source address
    /// of the request; the server checks it).
    pub client: Ipv4Addr,
    /// Identifies the mapping; renewals repeat it.
    pub nonce: [u8; 12],
    /// The internal UDP port to map.
    pub internal_port: u16,
    /// A preferred external address and port (a renewal asks for what it
    /// has); `None`: no preference.
    pub suggested: Option<SocketAddrV4>,
    /// Seconds; 0 deletes the mapping.
    pub lifetime: u32,
}

/// Encodes a PCP MAP request (60 bytes).
pub fn encode_pcp_map(req: &PcpMapRequest) -> [u8; PCP_MAP_MESSAGE_LEN] {
    let mut b = [0u8; PCP_MAP_MESSAGE_LEN];
    b[0] = PCP_VERSION;
    b[1] = PCP_OP_MAP;
    b[4..8].copy_from_slice(&req.lifetime.to_be_bytes());
    b[8..24].copy_from_slice(&req.client.to_ipv6_mapped().octets());
    b[24..36].copy_from_slice(&req.nonce);
    b[36] = PROTO_UDP;
    b[40..42].copy_from_slice(&req.internal_port.to_be_bytes());
    let (port, ip) = match req.suggested {
        Some(s) => (s.port(), *s.ip()),
        None => (0, Ipv4Addr::UNSPECIFIED),
    };
    b[42..44].copy_from_slice(&port.to_be_bytes());
    b[44..60].copy_from_slice(&ip.to_ipv6_mapped().octets());
    b
}

/// Encodes a NAT-PMP external address request (2 bytes).
pub fn encode_natpmp_address() -> [u8; 2] {
    [NATPMP_VERSION, NATPMP_OP_ADDRESS]
}

/// Encodes a NAT-PMP UDP mapping request (12 bytes); `lifetime` 0 deletes
/// the mapping.
pub fn encode_natpmp_map(internal_port: u16, suggested_port: u16, lifetime: u32) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0] = NATPMP_VERSION;
    b[1] = NATPMP_OP_MAP_UDP;
    b[4..6].copy_from_slice(&internal_port.to_be_bytes());
    b[6..8].copy_from_slice(&suggested_port.to_be_bytes());
    b[8..12].copy_from_slice(&lifetime.to_be_bytes());
    b
}

/// A parsed answer from a PCP or NAT-PMP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response {
    /// A PCP MAP response. `map` is present on success, and on an error
    /// response long enough to carry the request's payload back.
    PcpMap {
        /// Result code (0 success, 1 `UNSUPP_VERSION`, 2 `NOT_AUTHORIZED`, …).
        result: u8,
        /// Granted lifetime, seconds (on error: how long not to retry).
        lifetime: u32,
        /// The server's epoch time, seconds.
        epoch: u32,
        /// The MAP payload.
        map: Option<PcpMap>,
    },
    /// Any PCP response with a result other than success whose opcode is
    /// not MAP (a server that does not know the version may answer so).
    PcpError {
        /// The version the server speaks.
        version: u8,
        /// Result code.
        result: u8,
    },
    /// A NAT-PMP external address response.
    NatPmpAddress {
        /// Result code (0 success).
        result: u16,
        /// Seconds since the server's mapping table was (re)initialised.
        epoch: u32,
        /// The external IPv4 address (unspecified on error).
        external: Ipv4Addr,
    },
    /// A NAT-PMP UDP mapping response.
    NatPmpMap {
        /// Result code (0 success).
        result: u16,
        /// Seconds since the server's mapping table was (re)initialised.
        epoch: u32,
        /// The internal port it answers for (0 on a short error response).
        internal_port: u16,
        /// The external port mapped.
        external_port: u16,
        /// Granted lifetime, seconds.
        lifetime: u32,
    },
    /// A NAT-PMP error response to a request of another version or opcode
    /// (8 bytes: a NAT-PMP server answering PCP says so this way).
    NatPmpError {
        /// The opcode it answers (request opcode + 128).
        opcode: u8,
        /// Result code.
        result: u16,
    },
}

/// The MAP payload of a PCP response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PcpMap {
    /// The nonce of the request it answers.
    pub nonce: [u8; 12],
    /// IANA protocol number.
    pub protocol: u8,
    /// The internal port.
    pub internal_port: u16,
    /// The assigned external port.
    pub external_port: u16,
    /// The assigned external address (IPv4-mapped for IPv4).
    pub external_ip: Ipv6Addr,
}

/// Why an answer could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Fewer bytes than any answer of this version and opcode has.
    #[error("{len} bytes: too short for a version {version} answer")]
    TooShort {
        /// The version byte.
        version: u8,
        /// Bytes received.
        len: usize,
    },
    /// A PCP message longer than 1100 bytes or not a multiple of 4.
    #[error("{len} bytes: not a valid PCP message length")]
    BadLength {
        /// Bytes received.
        len: usize,
    },
    /// Neither PCP (2) nor NAT-PMP (0).
    #[error("unknown version {0}")]
    UnknownVersion(u8),
    /// A request, or a response to an opcode we never send.
    #[error("opcode {0}: not an answer to a request of ours")]
    UnexpectedOpcode(u8),
}

/// Parses a datagram from a PCP or NAT-PMP server.
pub fn parse(d: &[u8]) -> Result<Response, ParseError> {
    let Some(&version) = d.first() else {
        return Err(ParseError::TooShort { version: 0, len: 0 });
    };
    let too_short = || ParseError::TooShort {
        version,
        len: d.len(),
    };
    let u16_at = |i: usize| u16::from_be_bytes([d[i], d[i + 1]]);
    let u32_at = |i: usize| u32::from_be_bytes([d[i], d[i + 1], d[i + 2], d[i + 3]]);
    match version {
        PCP_VERSION => {
            if d.len() < PCP_HEADER_LEN {
                return Err(too_short());
            }
            if d.len() > PCP_MAX_LEN || !d.len().is_multiple_of(4) {
                return Err(ParseError::BadLength { len: d.len() });
            }
            let opcode = d[1];
            if opcode & PCP_RESPONSE == 0 {
                return Err(ParseError::UnexpectedOpcode(opcode));
            }
            let result = d[3];
            if opcode != PCP_RESPONSE | PCP_OP_MAP {
                if result != 0 {
                    return Ok(Response::PcpError { version, result });
                }
                return Err(ParseError::UnexpectedOpcode(opcode));
            }
            let lifetime = u32_at(4);
            let epoch = u32_at(8);
            let map = if d.len() >= PCP_MAP_MESSAGE_LEN {
                let mut nonce = [0u8; 12];
                nonce.copy_from_slice(&d[24..36]);
                let mut ip = [0u8; 16];
                ip.copy_from_slice(&d[44..60]);
                Some(PcpMap {
                    nonce,
                    protocol: d[36],
                    internal_port: u16_at(40),
                    external_port: u16_at(42),
                    external_ip: Ipv6Addr::from(ip),
                })
            } else if result == 0 {
                return Err(too_short());
            } else {
                None
            };
            Ok(Response::PcpMap {
                result,
                lifetime,
                epoch,
                map,
            })
        }
        NATPMP_VERSION => {
            if d.len() < 2 {
                return Err(too_short());
            }
            let opcode = d[1];
            if opcode < NATPMP_RESPONSE {
                return Err(ParseError::UnexpectedOpcode(opcode));
            }
            if d.len() < NATPMP_ERROR_LEN {
                return Err(too_short());
            }
            let result = u16_at(2);
            let epoch = u32_at(4);
            match opcode - NATPMP_RESPONSE {
                NATPMP_OP_ADDRESS if d.len() >= NATPMP_ADDRESS_RESPONSE_LEN => {
                    Ok(Response::NatPmpAddress {
                        result,
                        epoch,
                        external: Ipv4Addr::new(d[8], d[9], d[10], d[11]),
                    })
                }
                NATPMP_OP_MAP_UDP if d.len() >= NATPMP_MAP_RESPONSE_LEN => {
                    Ok(Response::NatPmpMap {
                        result,
                        epoch,
                        internal_port: u16_at(8),
                        external_port: u16_at(10),
                        lifetime: u32_at(12),
                    })
                }
                _ if result != 0 => Ok(Response::NatPmpError { opcode, result }),
                NATPMP_OP_ADDRESS | NATPMP_OP_MAP_UDP => Err(too_short()),
                _ => Err(ParseError::UnexpectedOpcode(opcode)),
            }
        }
        other => Err(ParseError::UnknownVersion(other)),
    }
}

/// Why an answer was dropped by [`PortMapper::handle_response`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    /// Not a PCP or NAT-PMP answer.
    #[error("malformed answer: {0}")]
    Malformed(#[from] ParseError),
    /// No request of ours is waiting for an answer of this kind.
    #[error("unsolicited {0} answer")]
    Unsolicited(Protocol),
    /// A PCP answer for another mapping.
    #[error("PCP answer with a nonce that is not ours")]
    WrongNonce,
    /// An answer for another protocol than UDP.
    #[error("answer for IP protocol {0}, not UDP")]
    WrongProtocol(u8),
    /// An answer for another internal port.
    #[error("answer for internal port {got}, not {expected}")]
    WrongPort {
        /// Ours.
        expected: u16,
        /// The answer's.
        got: u16,
    },
    /// A success without a usable external address or port (unspecified,
    /// not IPv4, port 0, lifetime 0).
    #[error("success answer without a usable mapping ({0})")]
    Unusable(&'static str),
}

/// What a [`PortMapper`] maps and how often it tries.
#[derive(Debug, Clone, Copy)]
pub struct MapperConfig {
    /// The internal UDP port (the WireGuard port).
    pub internal_port: u16,
    /// The client's address as the server sees it (the source address of
    /// the driver's socket).
    pub client: Ipv4Addr,
    /// Lifetime asked for, seconds.
    pub lifetime: u32,
    /// How long after a round that got nothing the next one starts.
    pub retry_interval: Duration,
}

impl MapperConfig {
    /// [`DEFAULT_LIFETIME`], and a new round every 5 minutes after failure.
    pub fn new(internal_port: u16, client: Ipv4Addr) -> Self {
        MapperConfig {
            internal_port,
            client,
            lifetime: DEFAULT_LIFETIME,
            retry_interval: Duration::from_secs(300),
        }
    }
}

/// A mapping the router granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// The external address and port that reach the internal port.
    pub external: SocketAddrV4,
    /// The protocol that got it.
    pub protocol: Protocol,
    /// Granted lifetime.
    pub lifetime: Duration,
    /// The server's epoch in its last answer.
    pub epoch: u32,
}

/// What the driver should know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A new or changed mapping (not sent again for a renewal that
    /// changes nothing).
    Mapped(Mapping),
    /// The mapping is gone (the router stopped answering or refused to
    /// renew it).
    Lost,
    /// The server refused a request with this result code; the round ends.
    Refused {
        /// The protocol refused.
        protocol: Protocol,
        /// The result code.
        result: u16,
    },
}

/// Where the mapper is.
#[derive(Debug, Clone, Copy)]
enum State {
    /// Requests out, waiting for answers.
    Requesting {
        /// The next retransmission, or giving up.
        next: Instant,
        /// The wait after the next retransmission.
        rto: Duration,
        /// Whether the next timeout sends (false: it gives up).
        resend: bool,
    },
    /// Nothing in flight until then (renewal, or the next round).
    Idle { until: Instant },
}

/// One UDP port mapping on the gateway's router; see the module docs.
#[derive(Debug)]
pub struct PortMapper {
    config: MapperConfig,
    nonce: [u8; 12],
    protocol: Protocol,
    state: State,
    mapping: Option<Mapping>,
    /// NAT-PMP: the external address answer of this round.
    pmp_address: Option<(Ipv4Addr, u32)>,
    /// NAT-PMP: the mapping answer of this round (port, lifetime, epoch).
    pmp_map: Option<(u16, u32, u32)>,
    transmits: VecDeque<Vec<u8>>,
    events: VecDeque<Event>,
}

impl PortMapper {
    /// A mapper that starts a PCP round at `now`; `nonce` must be
    /// unpredictable to others (RFC 6887 §11.1): random, or
    /// [`site_nonce`].
    pub fn new(config: MapperConfig, nonce: [u8; 12], now: Instant) -> Self {
        let mut m = PortMapper {
            config,
            nonce,
            protocol: Protocol::Pcp,
            state: State::Idle { until: now },
            mapping: None,
            pmp_address: None,
            pmp_map: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        };
        m.start_round(now);
        m
    }

    /// The mapping held now.
    pub fn mapping(&self) -> Option<Mapping> {
        self.mapping
    }

    /// The next datagram for the server.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`PortMapper::handle_timeout`] wants to run.
    pub fn poll_timeout(&self) -> Instant {
        match self.state {
            State::Requesting { next, .. } => next,
            State::Idle { until } => until,
        }
    }

    /// Retransmits, gives up, renews or starts a new round, as due.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Idle { until } if until <= now => self.start_round(now),
            State::Requesting { next, rto, resend } if next <= now => {
                if resend {
                    self.queue_requests();
                    let last = rto >= LAST_RTO;
                    self.state = State::Requesting {
                        next: now + rto,
                        rto: (rto * 2).min(LAST_RTO),
                        resend: !last,
                    };
                } else {
                    self.give_up(now);
                }
            }
            _ => {}
        }
    }

    /// The request that deletes the mapping held (lifetime 0), to send
    /// once on shutdown; `None` without a mapping.
    pub fn delete_request(&self) -> Option<Vec<u8>> {
        let mapping = self.mapping?;
        Some(self.map_request(mapping.protocol, None, 0))
    }

    /// A map request in `protocol` for our internal port, suggesting the
    /// external address `suggested` (NAT-PMP: its port; none: our internal
    /// port, and 0 in a delete, lifetime 0).
    fn map_request(
        &self,
        protocol: Protocol,
        suggested: Option<SocketAddrV4>,
        lifetime: u32,
    ) -> Vec<u8> {
        let port = self.config.internal_port;
        match protocol {
            Protocol::Pcp => encode_pcp_map(&PcpMapRequest {
                client: self.config.client,
                nonce: self.nonce,
                internal_port: port,
                suggested,
                lifetime,
            })
            .to_vec(),
            Protocol::NatPmp => {
                let suggested = match (suggested, lifetime) {
                    (Some(a), _) => a.port(),
                    (None, 0) => 0,
                    (None, _) => port,
                };
                encode_natpmp_map(port, suggested, lifetime).to_vec()
            }
        }
    }

    /// An answer from the server. Errors say why it was dropped (count
    /// them); nothing changes then.
    pub fn handle_response(&mut self, now: Instant, datagram: &[u8]) -> Result<(), AnswerError> {
        let response = parse(datagram)?;
        let requesting = matches!(self.state, State::Requesting { .. });
        let protocol = self.protocol;
        // An answer counts only while we ask, in its protocol.
        let solicited = |p: Protocol| {
            if requesting && protocol == p {
                Ok(())
            } else {
                Err(AnswerError::Unsolicited(p))
            }
        };
        match response {
            Response::PcpMap {
                result,
                lifetime,
                epoch,
                map,
            } => {
                solicited(Protocol::Pcp)?;
                if let Some(map) = map {
                    self.check_pcp_map(&map)?;
                }
                if result != 0 {
                    return self.refused(now, Protocol::Pcp, result.into(), lifetime);
                }
                let map = map.ok_or(AnswerError::Unusable("no payload"))?;
                let ip = map
                    .external_ip
                    .to_ipv4_mapped()
                    .ok_or(AnswerError::Unusable("not an IPv4 address"))?;
                self.granted(
                    now,
                    Protocol::Pcp,
                    SocketAddrV4::new(ip, map.external_port),
                    lifetime,
                    epoch,
                )
            }
            Response::PcpError { result, .. } => {
                solicited(Protocol::Pcp)?;
                self.refused(now, Protocol::Pcp, result.into(), 0)
            }
            Response::NatPmpError { .. } if self.protocol == Protocol::Pcp => {
                // A NAT-PMP server's answer to our PCP request: it speaks
                // only version 0, whatever its result code says.
                if !requesting {
                    return Err(AnswerError::Unsolicited(Protocol::NatPmp));
                }
                self.refused(now, Protocol::Pcp, RESULT_UNSUPPORTED_VERSION, 0)
            }
            Response::NatPmpError { result, .. } => {
                solicited(Protocol::NatPmp)?;
                self.refused(now, Protocol::NatPmp, result, 0)
            }
            Response::NatPmpAddress {
                result,
                epoch,
                external,
            } => {
                solicited(Protocol::NatPmp)?;
                if result != 0 {
                    return self.refused(now, Protocol::NatPmp, result, 0);
                }
                self.pmp_address = Some((external, epoch));
                self.natpmp_done(now)
            }
            Response::NatPmpMap {
                result,
                epoch,
                internal_port,
                external_port,
                lifetime,
            } => {
                solicited(Protocol::NatPmp)?;
                if result != 0 {
                    return self.refused(now, Protocol::NatPmp, result, 0);
                }
                if internal_port != self.config.internal_port {
                    return Err(AnswerError::WrongPort {
                        expected: self.config.internal_port,
                        got: internal_port,
                    });
                }
                self.pmp_map = Some((external_port, lifetime, epoch));
                self.natpmp_done(now)
            }
        }
    }

    fn check_pcp_map(&self, map: &PcpMap) -> Result<(), AnswerError> {
        if map.nonce != self.nonce {
            return Err(AnswerError::WrongNonce);
        }
        if map.protocol != PROTO_UDP {
            return Err(AnswerError::WrongProtocol(map.protocol));
        }
        if map.internal_port != self.config.internal_port {
            return Err(AnswerError::WrongPort {
                expected: self.config.internal_port,
                got: map.internal_port,
            });
        }
        Ok(())
    }

    /// NAT-PMP: both answers in?
    fn natpmp_done(&mut self, now: Instant) -> Result<(), AnswerError> {
        let (Some((ip, _)), Some((port, lifetime, epoch))) = (self.pmp_address, self.pmp_map)
        else {
            return Ok(());
        };
        self.granted(
            now,
            Protocol::NatPmp,
            SocketAddrV4::new(ip, port),
            lifetime,
            epoch,
        )
    }

    fn granted(
        &mut self,
        now: Instant,
        protocol: Protocol,
        external: SocketAddrV4,
        lifetime: u32,
        epoch: u32,
    ) -> Result<(), AnswerError> {
        if external.ip().is_unspecified() {
            return Err(AnswerError::Unusable("unspecified external address"));
        }
        if external.port() == 0 {
            return Err(AnswerError::Unusable("external port 0"));
        }
        if lifetime == 0 {
            return Err(AnswerError::Unusable("lifetime 0"));
        }
        let lifetime = Duration::from_secs(lifetime.into());
        let mapping = Mapping {
            external,
            protocol,
            lifetime,
            epoch,
        };
        if self.mapping.map(|m| m.external) != Some(external) {
            self.events.push_back(Event::Mapped(mapping));
        }
        self.mapping = Some(mapping);
        self.state = State::Idle {
            until: now + lifetime / 2,
        };
        Ok(())
    }

    /// The server said no: fall back from PCP to NAT-PMP on a version
    /// error, else end the round (a mapping held is lost). `wait` is the
    /// server's hint, seconds, at least the retry interval.
    fn refused(
        &mut self,
        now: Instant,
        protocol: Protocol,
        result: u16,
        wait: u32,
    ) -> Result<(), AnswerError> {
        if protocol == Protocol::Pcp && result == RESULT_UNSUPPORTED_VERSION {
            self.protocol = Protocol::NatPmp;
            self.start_round(now);
            return Ok(());
        }
        self.events.push_back(Event::Refused { protocol, result });
        self.lose();
        let wait = Duration::from_secs(wait.into()).max(self.config.retry_interval);
        self.state = State::Idle { until: now + wait };
        Ok(())
    }

    /// A round got no answer: PCP falls back to NAT-PMP (at once), NAT-PMP
    /// waits for the next round (which starts with PCP again).
    fn give_up(&mut self, now: Instant) {
        if self.protocol == Protocol::Pcp && self.mapping.is_none() {
            self.protocol = Protocol::NatPmp;
            self.start_round(now);
            return;
        }
        self.lose();
        self.protocol = Protocol::Pcp;
        self.state = State::Idle {
            until: now + self.config.retry_interval,
        };
    }

    fn lose(&mut self) {
        if self.mapping.take().is_some() {
            self.events.push_back(Event::Lost);
        }
    }

    fn start_round(&mut self, now: Instant) {
        self.pmp_address = None;
        self.pmp_map = None;
        self.transmits.clear();
        self.queue_requests();
        self.state = State::Requesting {
            next: now + FIRST_RTO,
            rto: FIRST_RTO * 2,
            resend: true,
        };
    }

    fn queue_requests(&mut self) {
        let held = self.mapping.map(|m| m.external);
        let map = self.map_request(self.protocol, held, self.config.lifetime);
        match self.protocol {
            Protocol::Pcp => self.transmits.push_back(map),
            Protocol::NatPmp => {
                if self.pmp_address.is_none() {
                    self.transmits.push_back(encode_natpmp_address().to_vec());
                }
                if self.pmp_map.is_none() {
                    self.transmits.push_back(map);
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::*;

    const NONCE: [u8; 12] = [0xa5; 12];
    const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 20);

    fn mapper(t0: Instant) -> PortMapper {
        PortMapper::new(MapperConfig::new(51820, CLIENT), NONCE, t0)
    }

    /// A PCP MAP success answer, built by hand after RFC 6887 §7.2, §11.1.
    fn pcp_answer(result: u8, nonce: [u8; 12], port: u16, external: [u8; 4]) -> Vec<u8> {
        let mut d = vec![
            2, 0x81, 0, result, // version, R|MAP, reserved, result
            0, 0, 0x1c, 0x20, // lifetime 7200
            0, 0, 0, 100, // epoch 100
        ];
        d.extend([0; 12]); // reserved
        d.extend(nonce);
        d.extend([17, 0, 0, 0]); // UDP, reserved
        d.extend(port.to_be_bytes()); // internal port
        d.extend([0xc3, 0x50]); // external port 50000
        d.extend([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        d.extend(external);
        d
    }

    #[test]
    fn pcp_map_request_matches_rfc_6887_layout() {
        let req = PcpMapRequest {
            client: CLIENT,
            nonce: NONCE,
            internal_port: 51820,
            suggested: None,
            lifetime: 7200,
        };
        let b = encode_pcp_map(&req);
        let mut want = vec![2, 1, 0, 0, 0, 0, 0x1c, 0x20];
        want.extend([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 168, 1, 20]);
        want.extend(NONCE);
        want.extend([17, 0, 0, 0, 0xca, 0x6c, 0, 0]);
        want.extend([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0]);
        assert_eq!(b.to_vec(), want);
    }

    #[test]
    fn the_site_nonce_is_stable_per_key_and_port() {
        let a = site_nonce(&[1; 32], 51820);
        assert_eq!(a, site_nonce(&[1; 32], 51820));
        assert_ne!(a, site_nonce(&[2; 32], 51820));
        assert_ne!(a, site_nonce(&[1; 32], 51821));
    }

    #[test]
    fn natpmp_requests_match_rfc_6886_layout() {
        assert_eq!(encode_natpmp_address(), [0, 0]);
        assert_eq!(
            encode_natpmp_map(51820, 51820, 7200),
            [0, 1, 0, 0, 0xca, 0x6c, 0xca, 0x6c, 0, 0, 0x1c, 0x20]
        );
    }

    #[test]
    fn parses_answers_of_both_protocols() {
        let pcp = pcp_answer(0, NONCE, 51820, [203, 0, 113, 5]);
        match parse(&pcp).unwrap() {
            Response::PcpMap {
                result: 0,
                lifetime: 7200,
                epoch: 100,
                map: Some(map),
            } => {
                assert_eq!(map.external_port, 50000);
                assert_eq!(
                    map.external_ip.to_ipv4_mapped(),
                    Some(Ipv4Addr::new(203, 0, 113, 5))
                );
            }
            other => panic!("{other:?}"),
        }
        let address = [0, 128, 0, 0, 0, 0, 1, 0, 203, 0, 113, 5];
        assert_eq!(
            parse(&address).unwrap(),
            Response::NatPmpAddress {
                result: 0,
                epoch: 256,
                external: Ipv4Addr::new(203, 0, 113, 5)
            }
        );
        let map = [
            0, 129, 0, 0, 0, 0, 1, 0, 0xca, 0x6c, 0xc3, 0x50, 0, 0, 0x0e, 0x10,
        ];
        assert_eq!(
            parse(&map).unwrap(),
            Response::NatPmpMap {
                result: 0,
                epoch: 256,
                internal_port: 51820,
                external_port: 50000,
                lifetime: 3600
            }
        );
        // A NAT-PMP server's answer to a PCP request: unsupported version.
        assert_eq!(
            parse(&[0, 129, 0, 1, 0, 0, 0, 9]).unwrap(),
            Response::NatPmpError {
                opcode: 129,
                result: 1
            }
        );
    }

    #[test]
    fn malformed_answers_are_typed_errors() {
        let pcp = pcp_answer(0, NONCE, 51820, [203, 0, 113, 5]);
        assert_eq!(parse(&[]), Err(ParseError::TooShort { version: 0, len: 0 }));
        assert_eq!(parse(&[7, 0x81]), Err(ParseError::UnknownVersion(7)));
        assert_eq!(
            parse(&pcp[..23]),
            Err(ParseError::TooShort {
                version: 2,
                len: 23
            })
        );
        assert_eq!(parse(&pcp[..58]), Err(ParseError::BadLength { len: 58 }));
        assert_eq!(
            parse(&pcp[..56]),
            Err(ParseError::TooShort {
                version: 2,
                len: 56
            })
        );
        let mut request = pcp.clone();
        request[1] = 1;
        assert_eq!(parse(&request), Err(ParseError::UnexpectedOpcode(1)));
        assert_eq!(parse(&[0, 1, 0, 0]), Err(ParseError::UnexpectedOpcode(1)));
        assert_eq!(
            parse(&[0, 129, 0, 0, 0, 0, 1, 0, 0xca, 0x6c]),
            Err(ParseError::TooShort {
                version: 0,
                len: 10
            })
        );
        assert_eq!(
            parse(&[0, 130, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(ParseError::UnexpectedOpcode(130))
        );
    }

    #[test]
    fn pcp_mapping_is_granted_checked_and_renewed_at_half_its_lifetime() {
        let t0 = Instant::now();
        let mut m = mapper(t0);
        let first = m.poll_transmit().unwrap();
        assert_eq!(first.len(), 60);
        assert_eq!(m.poll_transmit(), None);
        // Answers for another nonce, protocol or port are dropped.
        let mut other = pcp_answer(0, [1; 12], 51820, [203, 0, 113, 5]);
        assert_eq!(m.handle_response(t0, &other), Err(AnswerError::WrongNonce));
        other = pcp_answer(0, NONCE, 51821, [203, 0, 113, 5]);
        assert_eq!(
            m.handle_response(t0, &other),
            Err(AnswerError::WrongPort {
                expected: 51820,
                got: 51821
            })
        );
        other = pcp_answer(0, NONCE, 51820, [203, 0, 113, 5]);
        other[36] = 6;
        assert_eq!(
            m.handle_response(t0, &other),
            Err(AnswerError::WrongProtocol(6))
        );
        other = pcp_answer(0, NONCE, 51820, [0, 0, 0, 0]);
        assert!(matches!(
            m.handle_response(t0, &other),
            Err(AnswerError::Unusable(_))
        ));
        assert_eq!(m.poll_event(), None);
        // The real answer.
        let ms = |n| t0 + Duration::from_millis(n);
        m.handle_response(ms(5), &pcp_answer(0, NONCE, 51820, [203, 0, 113, 5]))
            .unwrap();
        let external = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 5), 50000);
        match m.poll_event() {
            Some(Event::Mapped(mapping)) => {
                assert_eq!(mapping.external, external);
                assert_eq!(mapping.protocol, Protocol::Pcp);
            }
            other => panic!("{other:?}"),
        }
        // An answer repeated (or replayed) now answers nothing.
        assert_eq!(
            m.handle_response(ms(6), &pcp_answer(0, NONCE, 51820, [203, 0, 113, 5])),
            Err(AnswerError::Unsolicited(Protocol::Pcp))
        );
        // Renewal at half the lifetime, asking for the same external port.
        assert_eq!(m.poll_timeout(), ms(5) + Duration::from_secs(3600));
        m.handle_timeout(ms(5) + Duration::from_secs(3600));
        let renewal = m.poll_transmit().unwrap();
        assert_eq!(&renewal[24..36], &NONCE);
        assert_eq!(&renewal[42..44], &50000u16.to_be_bytes());
        assert_eq!(&renewal[56..60], &[203, 0, 113, 5]);
        // Unchanged: no new event.
        m.handle_response(
            ms(10) + Duration::from_secs(3600),
            &pcp_answer(0, NONCE, 51820, [203, 0, 113, 5]),
        )
        .unwrap();
        assert_eq!(m.poll_event(), None);
        // Deleting it on shutdown: lifetime 0.
        let delete = m.delete_request().unwrap();
        assert_eq!(&delete[4..8], &[0, 0, 0, 0]);
    }

    #[test]
    fn pcp_unsupported_version_falls_back_to_natpmp() {
        for answer in [
            // A PCP server of another version, header only.
            {
                let mut d = vec![2, 0x81, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0];
                d.extend([0; 12]);
                d
            },
            // A NAT-PMP-only server.
            vec![0, 129, 0, 1, 0, 0, 0, 9],
        ] {
            let t0 = Instant::now();
            let mut m = mapper(t0);
            m.poll_transmit().unwrap();
            m.handle_response(t0, &answer).unwrap();
            assert_eq!(m.poll_transmit(), Some(vec![0, 0]));
            assert_eq!(m.poll_transmit().unwrap()[..2], [0, 1]);
            let address = [0, 128, 0, 0, 0, 0, 1, 0, 203, 0, 113, 5];
            let map = [
                0, 129, 0, 0, 0, 0, 1, 0, 0xca, 0x6c, 0xc3, 0x50, 0, 0, 0x0e, 0x10,
            ];
            // A mapping answer for another port is dropped.
            let mut wrong = map;
            wrong[9] = 0x6d;
            assert!(matches!(
                m.handle_response(t0, &wrong),
                Err(AnswerError::WrongPort { .. })
            ));
            m.handle_response(t0, &map).unwrap();
            assert_eq!(m.poll_event(), None, "waits for the address");
            m.handle_response(t0, &address).unwrap();
            match m.poll_event() {
                Some(Event::Mapped(mapping)) => {
                    assert_eq!(mapping.protocol, Protocol::NatPmp);
                    assert_eq!(mapping.external.to_string(), "203.0.113.5:50000");
                    assert_eq!(mapping.lifetime, Duration::from_secs(3600));
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(m.delete_request().unwrap()[8..], [0, 0, 0, 0]);
        }
    }

    #[test]
    fn silence_backs_off_then_gives_up_quietly_and_tries_again_later() {
        let t0 = Instant::now();
        let mut m = mapper(t0);
        let mut sent = Vec::new();
        let mut now = t0;
        let end = t0 + Duration::from_secs(60);
        loop {
            while let Some(d) = m.poll_transmit() {
                sent.push((now.duration_since(t0).as_millis(), d[0]));
            }
            now = m.poll_timeout();
            if now > end {
                break;
            }
            m.handle_timeout(now);
        }
        let pcp: Vec<u128> = sent.iter().filter(|s| s.1 == 2).map(|s| s.0).collect();
        assert_eq!(pcp, [0, 250, 750, 1750, 3750]);
        // Then NAT-PMP, two requests at a time, on the same schedule.
        let pmp: Vec<u128> = sent.iter().filter(|s| s.1 == 0).map(|s| s.0).collect();
        assert_eq!(
            pmp,
            [7750, 7750, 8000, 8000, 8500, 8500, 9500, 9500, 11500, 11500]
        );
        assert_eq!(m.poll_event(), None);
        // The next round is PCP again, five minutes after.
        assert_eq!(
            m.poll_timeout(),
            t0 + Duration::from_millis(15_500 + 300_000)
        );
    }

    #[test]
    fn a_refused_renewal_loses_the_mapping() {
        let t0 = Instant::now();
        let mut m = mapper(t0);
        m.handle_response(t0, &pcp_answer(0, NONCE, 51820, [203, 0, 113, 5]))
            .unwrap();
        assert!(matches!(m.poll_event(), Some(Event::Mapped(_))));
        let renew = t0 + Duration::from_secs(3600);
        m.handle_timeout(renew);
        // NOT_AUTHORIZED (2), with the payload copied back.
        m.handle_response(renew, &pcp_answer(2, NONCE, 51820, [0, 0, 0, 0]))
            .unwrap();
        assert_eq!(
            m.poll_event(),
            Some(Event::Refused {
                protocol: Protocol::Pcp,
                result: 2
            })
        );
        assert_eq!(m.poll_event(), Some(Event::Lost));
        assert_eq!(m.mapping(), None);
    }

    #[test]
    fn garbage_never_panics() {
        let t0 = Instant::now();
        let mut m = mapper(t0);
        let mut seed = 1u32;
        for len in 0..80 {
            for _ in 0..50 {
                let d: Vec<u8> = (0..len)
                    .map(|i| {
                        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                        // Mostly valid versions, so that the deeper checks run.
                        match i {
                            0 => [0, 2][(seed >> 16) as usize % 2],
                            _ => (seed >> 16) as u8,
                        }
                    })
                    .collect();
                let _ = m.handle_response(t0, &d);
            }
        }
    }
}
