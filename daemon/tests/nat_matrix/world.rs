//! A deterministic network: two sites (each public or behind an RFC 4787
//! NAT), a STUN server, a rendezvous, and an internet with latency and
//! optional loss. Virtual clock, no sockets. Every packet is real bytes.
//!
//! Both sites are the daemon's own core (`causeway::core::Site`), driven
//! the way the daemon drives it: datagrams in (`handle_stun`,
//! `handle_probe`, `decapsulate`), peer updates in (`handle_peer_update`),
//! timers (`handle_timeout` when `poll_timeout` says so), and whatever it
//! sends out through its `Io`. The rendezvous is the server's own
//! `Registry`: a site's published candidates reach its peer exactly when
//! the real server would send a `peer_update`. What is simulated: the
//! internet, the NATs, the STUN server, and the QUIC transport of the
//! rendezvous (a fixed delay; relayed packets take two internet hops).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use causeway::config::PeerConfig;
use causeway::core::{Io, Peer, Site as Core, SiteParams, Source, TraversalParams};
use causeway::packet::View;
use causeway_nat::path::{Path, PathConfig};
use causeway_nat::probe;
use causeway_nat::rendezvous::Registry;
use causeway_nat::stun::{self, StunMessage};
use ipnet::IpNet;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::nat::{Filtering, Mapping, Nat};

/// The STUN server (on the rendezvous, in the real deployment).
pub(crate) const STUN_SERVER: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1)), 3478);

/// How a site reaches the internet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum SiteNat {
    /// A public address on the WireGuard socket, no NAT, no firewall.
    Public,
    /// Behind a NAT with these behaviours.
    Nat(Mapping, Filtering),
}

impl SiteNat {
    /// Public, then the nine NAT types.
    pub(crate) fn all() -> Vec<SiteNat> {
        let mut all = vec![SiteNat::Public];
        for m in Mapping::ALL {
            for f in Filtering::ALL {
                all.push(SiteNat::Nat(m, f));
            }
        }
        all
    }

    pub(crate) fn label(self) -> String {
        match self {
            SiteNat::Public => "public".to_owned(),
            SiteNat::Nat(m, f) => format!("{}/{}", m.short(), f.short()),
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct SimConfig {
    pub(crate) path: PathConfig,
    pub(crate) nat_timeout: Duration,
    /// One-way latency of every internet hop (site to site, site to server).
    pub(crate) latency: Duration,
    /// From a site learning new candidates to the peer receiving them.
    pub(crate) rendezvous_delay: Duration,
    /// Periodic STUN refresh (a STUN request also goes out whenever the path
    /// falls back to the relay, and at start); `None`: none in the run.
    pub(crate) stun_interval: Option<Duration>,
    /// Probability that the internet drops a packet.
    pub(crate) loss: f64,
    /// Site B starts this much later than site A.
    pub(crate) b_start: Duration,
    pub(crate) seed: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            path: PathConfig::default(),
            nat_timeout: Duration::from_secs(30),
            latency: Duration::from_millis(20),
            rendezvous_delay: Duration::from_millis(30),
            stun_interval: Some(Duration::from_secs(25)),
            loss: 0.0,
            b_start: Duration::from_millis(37),
            seed: 1,
        }
    }
}

/// One site: its address, its NAT, and the daemon's core.
pub(crate) struct Site {
    pub(crate) host: SocketAddr,
    pub(crate) nat: Option<Nat>,
    pub(crate) core: Core,
    public: [u8; 32],
    /// Every path change, with the time since the start.
    pub(crate) path_log: Vec<(Duration, Path)>,
    /// Probes this site sent.
    pub(crate) probes_sent: u64,
    /// WireGuard messages this site handed to the relay.
    pub(crate) relayed: u64,
    /// When echo replies to this site's requests ([`World::send_request`])
    /// arrived, since the start.
    pub(crate) replies: Vec<Duration>,
}

/// What a core sent during one call, collected for the world to carry.
#[derive(Default)]
struct Outbox {
    /// With the IP TTL when the core asked for one.
    datagrams: Vec<(SocketAddr, Vec<u8>, Option<u8>)>,
    relayed: Vec<Vec<u8>>,
    published: Vec<Vec<SocketAddr>>,
    paths: Vec<Path>,
}

impl Io for Outbox {
    fn send(&mut self, to: SocketAddr, bytes: &[u8]) -> std::io::Result<()> {
        self.datagrams.push((to, bytes.to_vec(), None));
        Ok(())
    }

    fn send_with_ttl(&mut self, to: SocketAddr, bytes: &[u8], ttl: u8) -> std::io::Result<()> {
        self.datagrams.push((to, bytes.to_vec(), Some(ttl)));
        Ok(())
    }

    fn relay(&mut self, _peer: &std::sync::Arc<Peer>, bytes: &[u8]) -> bool {
        self.relayed.push(bytes.to_vec());
        true
    }

    fn publish_candidates(&mut self, candidates: &[SocketAddr]) {
        self.published.push(candidates.to_vec());
    }

    fn path_changed(&mut self, _peer: &Peer, path: Path) {
        self.paths.push(path);
    }
}

struct Packet {
    at: Instant,
    seq: u64,
    src: SocketAddr,
    dst: SocketAddr,
    payload: Vec<u8>,
}

impl PartialEq for Packet {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Packet {}
impl PartialOrd for Packet {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Packet {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// Something the rendezvous delivers to a site later.
enum Signal {
    /// A `peer_update` from the registry.
    PeerUpdate {
        peer: [u8; 32],
        candidates: Vec<SocketAddr>,
        online: bool,
    },
    /// A relayed WireGuard message from the other site.
    Relayed(Vec<u8>),
}

pub(crate) struct World {
    pub(crate) start: Instant,
    pub(crate) now: Instant,
    pub(crate) cfg: SimConfig,
    pub(crate) sites: [Site; 2],
    in_flight: BinaryHeap<Reverse<Packet>>,
    seq: u64,
    /// What the rendezvous hands to a site: (when, to site, what).
    signalling: Vec<(Instant, usize, Signal)>,
    registry: Registry,
    starts: [Option<Instant>; 2],
    rng: StdRng,
    pub(crate) lost: u64,
    pub(crate) unroutable: u64,
    /// Print every packet and path change (set `SIM_TRACE=1`).
    pub(crate) trace: bool,
}

const ECHO_REQUEST: u8 = b'Q';
const ECHO_REPLY: u8 = b'R';

/// The address of site `i`'s pod (inside its pod network, see [`core`]).
fn pod_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 200 + i as u8, 0, 1)
}

/// A minimal IPv4/UDP packet with a one-byte payload (UDP checksum 0:
/// none, allowed for IPv4).
fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, payload: u8) -> Vec<u8> {
    let mut p = vec![0u8; 29];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&29u16.to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let mut sum: u32 = p[..20]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p[20..22].copy_from_slice(&4000u16.to_be_bytes());
    p[22..24].copy_from_slice(&4000u16.to_be_bytes());
    p[24..26].copy_from_slice(&9u16.to_be_bytes());
    p[28] = payload;
    p
}

/// The core the daemon would build for site `i` with peer `peer`.
fn core(
    i: usize,
    secret: &StaticSecret,
    peer: PublicKey,
    host: SocketAddr,
    cfg: &SimConfig,
    start: Instant,
) -> Core {
    let net = |s: &str| -> IpNet { s.parse().expect("CIDR") };
    // Pod networks far from every simulated address, so that no candidate
    // is filtered as "inside the overlay".
    let peer_cidr = net(if i == 0 {
        "10.201.0.0/16"
    } else {
        "10.200.0.0/16"
    });
    let peers = [PeerConfig {
        name: format!("site{}", 1 - i),
        public_key: peer,
        cidrs: vec![peer_cidr],
        views: vec![View::identity(peer_cidr)],
        allow: Vec::new(),
        endpoint: None,
        persistent_keepalive: None,
    }];
    let mut traversal = TraversalParams::new(vec![STUN_SERVER], Vec::new(), vec![host]);
    traversal.path = cfg.path;
    // No periodic refresh within any run: a day.
    traversal.stun_interval = cfg.stun_interval.unwrap_or(Duration::from_secs(86_400));
    Core::new(
        SiteParams {
            private_key: secret.clone(),
            pod_cidrs: vec![net(if i == 0 {
                "10.200.0.0/16"
            } else {
                "10.201.0.0/16"
            })],
            mtu: 1420,
            traversal: Some(traversal),
            seed: cfg.seed * 31 + i as u64,
            role: causeway::core::Role::Active,
        },
        &peers,
        start,
    )
}

impl World {
    pub(crate) fn new(a: SiteNat, b: SiteNat, cfg: SimConfig) -> Self {
        let start = Instant::now();
        let secrets = [
            StaticSecret::from([0xA1; 32]),
            StaticSecret::from([0xB2; 32]),
        ];
        let publics = [PublicKey::from(&secrets[0]), PublicKey::from(&secrets[1])];
        let starts = [start, start + cfg.b_start];
        let site = |i: usize, kind: SiteNat| {
            let (host, nat) = match kind {
                SiteNat::Public => (SocketAddr::from(([192, 0, 2, 10 + i as u8], 51820)), None),
                SiteNat::Nat(m, f) => (
                    SocketAddr::from(([10, 0, 1 + i as u8, 2], 51820)),
                    Some(Nat::new(
                        m,
                        f,
                        IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1 + i as u8)),
                        cfg.nat_timeout,
                        cfg.seed * 7 + i as u64,
                    )),
                ),
            };
            Site {
                host,
                nat,
                core: core(i, &secrets[i], publics[1 - i], host, &cfg, starts[i]),
                public: publics[i].to_bytes(),
                path_log: Vec::new(),
                probes_sent: 0,
                relayed: 0,
                replies: Vec::new(),
            }
        };
        let registry = Registry::new(
            [
                (publics[0].to_bytes(), "site0".to_owned()),
                (publics[1].to_bytes(), "site1".to_owned()),
            ],
            1,
        );
        Self {
            start,
            now: start,
            cfg,
            sites: [site(0, a), site(1, b)],
            in_flight: BinaryHeap::new(),
            seq: 0,
            signalling: Vec::new(),
            registry,
            starts: starts.map(Some),
            rng: StdRng::seed_from_u64(cfg.seed),
            lost: 0,
            unroutable: 0,
            trace: std::env::var_os("SIM_TRACE").is_some(),
        }
    }

    pub(crate) fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Site `i`'s path to the other site.
    pub(crate) fn path(&self, i: usize) -> Path {
        let peers = self.sites[i].core.peers();
        let state = peers.get(0).lock();
        state.paths.as_ref().map_or(Path::Relay, |p| p.path())
    }

    /// Runs the world for `d` of virtual time.
    pub(crate) fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        let mut stuck = 0u32;
        loop {
            let next = self.next_wakeup().filter(|t| *t <= end);
            let Some(next) = next else { break };
            if next <= self.now {
                stuck += 1;
                assert!(stuck < 10_000, "no progress at {:?}", self.elapsed());
            } else {
                stuck = 0;
            }
            self.now = self.now.max(next);
            self.step();
        }
        self.now = end;
    }

    /// Runs until `done` holds (checked after every step), at most `limit`.
    pub(crate) fn run_until(
        &mut self,
        limit: Duration,
        mut done: impl FnMut(&World) -> bool,
    ) -> bool {
        let end = self.now + limit;
        while !done(self) {
            let Some(next) = self.next_wakeup().filter(|t| *t <= end) else {
                self.now = end;
                return done(self);
            };
            self.now = self.now.max(next);
            self.step();
        }
        true
    }

    fn next_wakeup(&self) -> Option<Instant> {
        let packets = self.in_flight.peek().map(|p| p.0.at);
        let signalling = self.signalling.iter().map(|s| s.0).min();
        let starts = self.starts.iter().flatten().copied();
        let timers = (0..2)
            .filter(|&i| self.starts[i].is_none())
            .filter_map(|i| self.sites[i].core.poll_timeout());
        packets
            .into_iter()
            .chain(signalling)
            .chain(starts)
            .chain(timers)
            .min()
    }

    fn step(&mut self) {
        let now = self.now;
        for i in 0..2 {
            if self.starts[i].is_some_and(|t| t <= now) {
                self.starts[i] = None;
                // The site dials the rendezvous.
                let (_, _, updates) = self.registry.connect(i as u64, self.sites[i].public);
                self.deliver_updates(updates);
            }
        }
        while self.in_flight.peek().is_some_and(|p| p.0.at <= now) {
            let Some(Reverse(packet)) = self.in_flight.pop() else {
                break;
            };
            self.deliver(packet);
        }
        let mut k = 0;
        while k < self.signalling.len() {
            if self.signalling[k].0 <= now {
                let (_, to, signal) = self.signalling.swap_remove(k);
                let mut out = Outbox::default();
                let core = &self.sites[to].core;
                match signal {
                    Signal::PeerUpdate {
                        peer,
                        candidates,
                        online,
                    } => core.handle_peer_update(now, &peer, candidates, online, &mut out),
                    Signal::Relayed(message) => {
                        let peers = core.peers();
                        let mut buf = vec![0u8; 2048];
                        let from = self.sites[1 - to].public;
                        let inner = core
                            .decapsulate_relayed(now, &peers, &from, &message, &mut buf, &mut out);
                        self.carry(to, out);
                        if let Some(len) = inner {
                            self.inner_packet(to, &buf[..len]);
                        }
                        continue;
                    }
                }
                self.carry(to, out);
            } else {
                k += 1;
            }
        }
        for i in 0..2 {
            if self.starts[i].is_none()
                && self.sites[i].core.poll_timeout().is_some_and(|t| t <= now)
            {
                let mut out = Outbox::default();
                self.sites[i].core.handle_timeout(now, &mut out);
                self.carry(i, out);
            }
        }
    }

    /// Carries out what site `i`'s core sent.
    fn carry(&mut self, i: usize, out: Outbox) {
        let Outbox {
            datagrams,
            relayed,
            published,
            paths,
        } = out;
        for path in paths {
            let elapsed = self.elapsed();
            if self.trace {
                println!("{elapsed:>12?} site {i}: {path:?}");
            }
            self.sites[i].path_log.push((elapsed, path));
        }
        for (dst, payload, ttl) in datagrams {
            if probe::is_probe(&payload) {
                self.sites[i].probes_sent += 1;
            }
            self.send(i, dst, payload, ttl);
        }
        for list in published {
            // The client re-registers with every published list; the
            // registry decides who hears about it.
            let peers = [self.sites[1 - i].public];
            let updates = self.registry.register(i as u64, peers, list);
            self.deliver_updates(updates);
        }
        for message in relayed {
            self.sites[i].relayed += 1;
            // Up to the rendezvous and down again.
            let at = self.now + 2 * self.cfg.latency;
            self.signalling.push((at, 1 - i, Signal::Relayed(message)));
        }
    }

    /// The rendezvous sends these `peer_update`s.
    fn deliver_updates(&mut self, updates: Vec<causeway_nat::rendezvous::Update>) {
        let at = self.now + self.cfg.rendezvous_delay;
        for u in updates {
            let signal = Signal::PeerUpdate {
                peer: u.peer,
                candidates: u.candidates,
                online: u.online,
            };
            self.signalling.push((at, u.to as usize, signal));
        }
    }

    /// Sends a datagram from site `i`'s WireGuard socket.
    /// A datagram with a TTL (an opening ping, `path::OPENING_TTL`) passes
    /// the site's own NAT and dies on the internet, as in the lab.
    fn send(&mut self, i: usize, dst: SocketAddr, payload: Vec<u8>, ttl: Option<u8>) {
        let now = self.now;
        let site = &mut self.sites[i];
        let src = match &mut site.nat {
            Some(nat) => nat.outbound(now, site.host, dst),
            None => site.host,
        };
        if ttl.is_some() {
            return;
        }
        self.transmit(src, dst, payload);
    }

    /// Puts a datagram on the internet.
    fn transmit(&mut self, src: SocketAddr, dst: SocketAddr, payload: Vec<u8>) {
        if self.cfg.loss > 0.0 && self.rng.gen_bool(self.cfg.loss) {
            self.lost += 1;
            return;
        }
        self.seq += 1;
        self.in_flight.push(Reverse(Packet {
            at: self.now + self.cfg.latency,
            seq: self.seq,
            src,
            dst,
            payload,
        }));
    }

    fn deliver(&mut self, p: Packet) {
        if self.trace {
            let what = if stun::is_stun(&p.payload) {
                "stun"
            } else if probe::is_probe(&p.payload) {
                "probe"
            } else {
                "wireguard"
            };
            println!("{:>12?} {} -> {} {what}", self.elapsed(), p.src, p.dst);
        }
        if p.dst == STUN_SERVER {
            self.stun_server(p);
            return;
        }
        let now = self.now;
        for i in 0..2 {
            let site = &mut self.sites[i];
            match &mut site.nat {
                Some(nat) if nat.external_ip == p.dst.ip() => {
                    if let Some(internal) = nat.inbound(now, p.src, p.dst.port()) {
                        assert_eq!(internal, site.host);
                        self.receive(i, p.src, &p.payload);
                    }
                    return;
                }
                None if site.host == p.dst => {
                    self.receive(i, p.src, &p.payload);
                    return;
                }
                _ => {}
            }
        }
        // A private address of the other site, or a stale one.
        self.unroutable += 1;
    }

    /// The STUN server answers Binding requests with the source it sees.
    fn stun_server(&mut self, p: Packet) {
        assert!(stun::is_stun(&p.payload));
        let Ok(StunMessage::BindingRequest { tx }) = stun::parse(&p.payload) else {
            panic!("STUN server got {:?}", stun::parse(&p.payload));
        };
        let mut buf = [0u8; stun::MAX_ENCODED_LEN];
        let n = stun::encode_binding_success(&tx, p.src, &mut buf);
        self.transmit(STUN_SERVER, p.src, buf[..n].to_vec());
    }

    /// A datagram arrives on site `i`'s WireGuard socket: demultiplexed as
    /// the daemon's inbound thread does.
    fn receive(&mut self, i: usize, from: SocketAddr, datagram: &[u8]) {
        let now = self.now;
        let mut out = Outbox::default();
        let core = &self.sites[i].core;
        let drops_before = core.drops.get(causeway::core::DropReason::Rejected)
            + core.drops.get(causeway::core::DropReason::Malformed);
        if probe::is_probe(datagram) {
            core.handle_probe(now, from, datagram, &mut out);
        } else if stun::is_stun(datagram) {
            core.handle_stun(from, datagram, &mut out);
            let drops_after = core.drops.get(causeway::core::DropReason::Rejected)
                + core.drops.get(causeway::core::DropReason::Malformed);
            assert_eq!(drops_before, drops_after, "site {i} refused a STUN answer");
        } else {
            let peers = core.peers();
            let mut buf = vec![0u8; 2048];
            let inner =
                core.decapsulate(now, &peers, Source::Udp(from), datagram, &mut buf, &mut out);
            self.carry(i, out);
            if let Some(len) = inner {
                self.inner_packet(i, &buf[..len]);
            }
            return;
        }
        self.carry(i, out);
    }

    /// Site `i`'s pod sends an echo request to the other site's pod, through
    /// the core as the daemon's outbound thread does.
    pub(crate) fn send_request(&mut self, i: usize) {
        self.send_inner(i, ECHO_REQUEST);
    }

    fn send_inner(&mut self, i: usize, kind: u8) {
        let mut packet = ipv4_udp(pod_addr(i), pod_addr(1 - i), kind);
        let mut out = vec![0u8; 2048];
        let mut icmp = vec![0u8; 2048];
        let mut io = Outbox::default();
        let core = &self.sites[i].core;
        let peers = core.peers();
        let result = core.encapsulate(self.now, &peers, &mut packet, &mut out, &mut icmp, &mut io);
        drop(peers);
        self.carry(i, io);
        if let causeway::core::Outbound::Send { to, len } = result {
            self.send(i, to, out[..len].to_vec(), None);
        }
    }

    /// A decrypted packet reached site `i`'s TUN: requests are answered,
    /// replies recorded.
    fn inner_packet(&mut self, i: usize, packet: &[u8]) {
        match packet.get(28) {
            Some(&ECHO_REQUEST) => self.send_inner(i, ECHO_REPLY),
            Some(&ECHO_REPLY) => {
                let at = self.elapsed();
                self.sites[i].replies.push(at);
            }
            _ => {}
        }
    }
}
