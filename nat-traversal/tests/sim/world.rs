//! A deterministic network: two sites (each public or behind an RFC 4787
//! NAT), a STUN server, a rendezvous that hands each site the other's
//! candidates, and an internet with latency and optional loss. Virtual clock,
//! no sockets. Every packet is real bytes, encoded and decoded with the
//! crate's `stun` and `probe` codecs; both sites run the real `PeerPaths`.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use causeway_nat::path::{Event, Path, PathConfig, PeerPaths, local_candidates};
use causeway_nat::probe::{self, ProbeKey};
use causeway_nat::stun::{self, StunMessage, TransactionId};
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
    /// falls back to the relay, and at start).
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

pub(crate) struct Site {
    pub(crate) host: SocketAddr,
    pub(crate) nat: Option<Nat>,
    pub(crate) paths: PeerPaths,
    key: ProbeKey,
    peer_public: [u8; 32],
    pub(crate) srflx: Option<SocketAddr>,
    stun_pending: Option<TransactionId>,
    /// Publish the candidates after the pending STUN answer even if unchanged.
    republish: bool,
    next_stun: Option<Instant>,
    rng: StdRng,
    /// Every path change, with the time since the start.
    pub(crate) path_log: Vec<(Duration, Path)>,
    /// Probes this site sent.
    pub(crate) probes_sent: u64,
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

pub(crate) struct World {
    pub(crate) start: Instant,
    pub(crate) now: Instant,
    pub(crate) cfg: SimConfig,
    pub(crate) sites: [Site; 2],
    in_flight: BinaryHeap<Reverse<Packet>>,
    seq: u64,
    /// Candidate lists on their way from the rendezvous: (when, to site, list).
    signalling: Vec<(Instant, usize, Vec<SocketAddr>)>,
    /// Each site's candidates as last reported to the rendezvous.
    registered: [Vec<SocketAddr>; 2],
    starts: [Option<Instant>; 2],
    rng: StdRng,
    pub(crate) lost: u64,
    pub(crate) unroutable: u64,
    /// Print every packet and path change (set `SIM_TRACE=1`).
    pub(crate) trace: bool,
}

impl World {
    pub(crate) fn new(a: SiteNat, b: SiteNat, cfg: SimConfig) -> Self {
        let start = Instant::now();
        let secrets = [
            StaticSecret::from([0xA1; 32]),
            StaticSecret::from([0xB2; 32]),
        ];
        let publics = [PublicKey::from(&secrets[0]), PublicKey::from(&secrets[1])];
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
                paths: PeerPaths::new(cfg.path, cfg.seed * 31 + i as u64),
                key: ProbeKey::derive(&secrets[i], &publics[1 - i]).expect("probe key"),
                peer_public: publics[1 - i].to_bytes(),
                srflx: None,
                stun_pending: None,
                republish: false,
                next_stun: None,
                rng: StdRng::seed_from_u64(cfg.seed * 131 + i as u64),
                path_log: Vec::new(),
                probes_sent: 0,
            }
        };
        Self {
            start,
            now: start,
            cfg,
            sites: [site(0, a), site(1, b)],
            in_flight: BinaryHeap::new(),
            seq: 0,
            signalling: Vec::new(),
            registered: [Vec::new(), Vec::new()],
            starts: [Some(start), Some(start + cfg.b_start)],
            rng: StdRng::seed_from_u64(cfg.seed),
            lost: 0,
            unroutable: 0,
            trace: std::env::var_os("SIM_TRACE").is_some(),
        }
    }

    pub(crate) fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    pub(crate) fn path(&self, i: usize) -> Path {
        self.sites[i].paths.path()
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
        let sites = self
            .sites
            .iter()
            .flat_map(|s| [s.paths.poll_timeout().map(|t| t.0), s.next_stun])
            .flatten();
        let starts = self.starts.iter().flatten().copied();
        packets
            .into_iter()
            .chain(signalling)
            .chain(sites)
            .chain(starts)
            .min()
    }

    fn step(&mut self) {
        let now = self.now;
        for i in 0..2 {
            if self.starts[i].is_some_and(|t| t <= now) {
                self.starts[i] = None;
                self.stun_now(i);
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
                let (_, to, list) = self.signalling.swap_remove(k);
                self.sites[to].paths.set_remote_candidates(now, list);
                self.flush(to);
            } else {
                k += 1;
            }
        }
        for i in 0..2 {
            if self.sites[i]
                .paths
                .poll_timeout()
                .is_some_and(|(t, _)| t <= now)
            {
                self.sites[i].paths.handle_timeout(now);
                self.flush(i);
            }
            if self.sites[i].next_stun.is_some_and(|t| t <= now) {
                self.stun_now(i);
            }
        }
    }

    /// Sends a datagram from site `i`'s WireGuard socket.
    fn send(&mut self, i: usize, dst: SocketAddr, payload: Vec<u8>) {
        let now = self.now;
        let site = &mut self.sites[i];
        let src = match &mut site.nat {
            Some(nat) => nat.outbound(now, site.host, dst),
            None => site.host,
        };
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
                "stun".to_owned()
            } else {
                format!(
                    "{:?}",
                    probe::open(&self.sites[0].key, &p.payload)
                        .or_else(|_| probe::open(&self.sites[1].key, &p.payload))
                )
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

    /// A datagram arrives on site `i`'s WireGuard socket: demultiplex it.
    fn receive(&mut self, i: usize, from: SocketAddr, datagram: &[u8]) {
        let now = self.now;
        if stun::is_stun(datagram) {
            assert!(!probe::is_probe(datagram));
            let msg = stun::parse(datagram).expect("valid STUN");
            let site = &mut self.sites[i];
            if let StunMessage::BindingSuccess { tx, mapped } = msg
                && site.stun_pending == Some(tx)
                && from == STUN_SERVER
            {
                site.stun_pending = None;
                if site.srflx != Some(mapped) || site.republish {
                    site.srflx = Some(mapped);
                    site.republish = false;
                    self.register(i);
                }
            }
        } else if probe::is_probe(datagram) {
            let site = &mut self.sites[i];
            assert_eq!(probe::sender(datagram), Some(site.peer_public));
            let probe = probe::open(&site.key, datagram).expect("authentic probe");
            site.paths.handle_probe(now, from, probe);
            self.flush(i);
        } else {
            panic!("site {i} got an unknown datagram from {from}");
        }
    }

    /// Sends what site `i`'s state machine queued; handles its events.
    fn flush(&mut self, i: usize) {
        while let Some(t) = self.sites[i].paths.poll_transmit() {
            let mut buf = [0u8; probe::MAX_PROBE_LEN];
            let n = probe::encode(&self.sites[i].key, &t.probe, &mut buf);
            self.sites[i].probes_sent += 1;
            self.send(i, t.dst, buf[..n].to_vec());
        }
        while let Some(Event::PathChanged(path)) = self.sites[i].paths.poll_event() {
            let elapsed = self.elapsed();
            if self.trace {
                println!("{elapsed:>12?} site {i}: {path:?}");
            }
            self.sites[i].path_log.push((elapsed, path));
            if path == Path::Relay {
                // The driver's job: the NAT may have changed our mapping, and
                // the peer may not know yet that the path is gone. Refresh
                // the server-reflexive address and publish the candidates
                // again, changed or not: the rendezvous introduces both
                // sites anew, which makes the peer check its path at once.
                self.sites[i].republish = true;
                self.stun_now(i);
            }
        }
    }

    /// Site `i` sends a STUN Binding request from its WireGuard socket.
    pub(crate) fn stun_now(&mut self, i: usize) {
        let site = &mut self.sites[i];
        let tx = TransactionId::random(&mut site.rng);
        site.stun_pending = Some(tx);
        site.next_stun = self.cfg.stun_interval.map(|d| self.now + d);
        let mut buf = [0u8; stun::MAX_ENCODED_LEN];
        let n = stun::encode_binding_request(&tx, &mut buf);
        self.send(i, STUN_SERVER, buf[..n].to_vec());
    }

    /// Site `i`'s candidates changed: the rendezvous introduces both sites
    /// again (each gets the other's current list).
    fn register(&mut self, i: usize) {
        let site = &self.sites[i];
        let srflx: Vec<SocketAddr> = site.srflx.into_iter().collect();
        self.registered[i] = local_candidates(&[], &srflx, &[site.host]);
        let at = self.now + self.cfg.rendezvous_delay;
        for to in 0..2 {
            let list = self.registered[1 - to].clone();
            if !list.is_empty() {
                self.signalling.push((at, to, list));
            }
        }
    }
}
