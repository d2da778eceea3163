//! `causeway-bench wide-sim`: many simulated WireGuard peers of one
//! daemon in one process, started by `causeway-bench wide` in a lab
//! namespace.
//!
//! Each simulated peer is a boringtun `noise::Tunn` with its own key and
//! its own UDP socket (so the daemon sees it at its own static endpoint).
//! The worker answers ICMP echo requests that arrive inside the tunnel,
//! counts what it receives per peer, and takes line commands on stdin:
//!
//! - `initiate`: every peer sends a handshake initiation at once; answers
//!   `ok`; the times in the counters count from here;
//! - `mark`: the times in the counters count from here; answers `ok`;
//! - `report`: answers one JSON line, the counters of every peer in order;
//! - end of input: exits.
//!
//! It runs boringtun's timers every 100 ms, so lost initiations are sent
//! again and cookie replies are honoured like in any WireGuard peer.

use std::io::{BufRead as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use boringtun::noise::{Tunn, TunnResult};
use causeway_common::keys;
use serde::{Deserialize, Serialize};

/// How often boringtun's timers run.
const TIMER_TICK: Duration = Duration::from_millis(100);
/// Big enough for any datagram and any packet the daemon sends.
const BUF: usize = 65_536;

/// What the worker is told, as a JSON file.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SimConfig {
    /// The daemon's public key.
    pub(crate) daemon_public_key: String,
    /// The daemon's WireGuard endpoint.
    pub(crate) daemon_endpoint: SocketAddr,
    /// The address every peer's socket binds.
    pub(crate) bind: Ipv4Addr,
    pub(crate) peers: Vec<SimPeer>,
}

/// One simulated peer.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SimPeer {
    pub(crate) private_key: String,
    pub(crate) port: u16,
}

/// What one simulated peer saw and did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SimCounters {
    /// Handshake initiations received from the daemon (the daemon
    /// started a session with this peer).
    pub(crate) initiations_rx: u64,
    /// Handshake responses received (to this peer's own initiations).
    pub(crate) responses_rx: u64,
    /// Cookie replies received (the daemon was under load).
    pub(crate) cookies_rx: u64,
    /// Inner packets decrypted (keepalives not counted).
    pub(crate) decrypted: u64,
    /// Echo replies sent back inside the tunnel.
    pub(crate) echo_replies: u64,
    /// Handshake initiations sent (by `initiate` and by the timers).
    pub(crate) initiations_tx: u64,
    /// Datagrams boringtun refused.
    pub(crate) errors: u64,
    /// When the first handshake response since the last `initiate` or
    /// `mark` came, ms after it (the handshake this peer initiated is
    /// complete on its side).
    pub(crate) response_ms: Option<u64>,
    /// When the first handshake initiation since then came, ms after it.
    pub(crate) initiation_ms: Option<u64>,
}

struct Sim {
    socket: UdpSocket,
    tunn: Tunn,
    counters: SimCounters,
    /// What `response_ms` and `initiation_ms` count from.
    epoch: Instant,
}

/// The worker's main: binds every peer's socket, says `ready`, serves.
pub(crate) fn worker(config: &Path) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    let cfg: SimConfig = serde_json::from_str(&text).context("a wide-sim config")?;
    let daemon_key = keys::decode_public(&cfg.daemon_public_key)?;
    let mut sims = Vec::with_capacity(cfg.peers.len());
    for (i, p) in cfg.peers.iter().enumerate() {
        let secret = keys::decode_private(&p.private_key)?;
        let socket = UdpSocket::bind((cfg.bind, p.port))
            .with_context(|| format!("binding {}:{}", cfg.bind, p.port))?;
        socket.set_nonblocking(true)?;
        let index = u32::try_from(i + 1).context("too many peers")?;
        sims.push(Sim {
            socket,
            tunn: Tunn::new(secret, daemon_key, None, None, index, None),
            counters: SimCounters::default(),
            epoch: Instant::now(),
        });
    }
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "ready")?;
    stdout.flush()?;
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let mut out = vec![0u8; BUF];
    let mut data = vec![0u8; BUF];
    let mut next_tick = Instant::now() + TIMER_TICK;
    loop {
        let mut fds: Vec<libc::pollfd> = std::iter::once(0)
            .chain(sims.iter().map(|s| s.socket.as_raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let wait = next_tick.saturating_duration_since(Instant::now());
        let ms = wait.as_millis().clamp(0, 1000) as i32;
        // SAFETY: a valid array of pollfds of the length given.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if ready > 0 {
            for (sim, fd) in sims.iter_mut().zip(&fds[1..]) {
                if fd.revents != 0 {
                    drain(sim, cfg.daemon_endpoint, &mut data, &mut out);
                }
            }
            if fds[0].revents != 0 {
                let mut line = String::new();
                if input.read_line(&mut line)? == 0 {
                    return Ok(());
                }
                let command = line.trim();
                if command == "initiate" || command == "mark" {
                    let now = Instant::now();
                    for sim in &mut sims {
                        sim.epoch = now;
                        sim.counters.response_ms = None;
                        sim.counters.initiation_ms = None;
                    }
                }
                match command {
                    "mark" => writeln!(stdout, "ok")?,
                    "initiate" => {
                        for sim in &mut sims {
                            if let TunnResult::WriteToNetwork(p) =
                                sim.tunn.format_handshake_initiation(&mut out, false)
                            {
                                sim.counters.initiations_tx += 1;
                                let _ = sim.socket.send_to(p, cfg.daemon_endpoint);
                            }
                        }
                        writeln!(stdout, "ok")?;
                    }
                    "report" => {
                        let counters: Vec<&SimCounters> =
                            sims.iter().map(|s| &s.counters).collect();
                        writeln!(stdout, "{}", serde_json::to_string(&counters)?)?;
                    }
                    other => writeln!(stdout, "error: unknown command {other:?}")?,
                }
                stdout.flush()?;
            }
        }
        if Instant::now() >= next_tick {
            next_tick = Instant::now() + TIMER_TICK;
            for sim in &mut sims {
                if let TunnResult::WriteToNetwork(p) = sim.tunn.update_timers(&mut out) {
                    if p.first() == Some(&1) {
                        sim.counters.initiations_tx += 1;
                    }
                    let _ = sim.socket.send_to(p, cfg.daemon_endpoint);
                }
            }
        }
    }
}

/// Reads and handles every datagram waiting on `sim`'s socket.
fn drain(sim: &mut Sim, daemon: SocketAddr, data: &mut [u8], out: &mut [u8]) {
    while let Ok((len, from)) = sim.socket.recv_from(data) {
        handle(sim, from.ip(), &data[..len], daemon, out);
    }
}

fn handle(sim: &mut Sim, from: IpAddr, datagram: &[u8], daemon: SocketAddr, out: &mut [u8]) {
    let c = &mut sim.counters;
    let ms = || Some(sim.epoch.elapsed().as_millis() as u64);
    match datagram.first() {
        Some(1) => {
            c.initiations_rx += 1;
            c.initiation_ms = c.initiation_ms.or_else(ms);
        }
        Some(2) => {
            c.responses_rx += 1;
            c.response_ms = c.response_ms.or_else(ms);
        }
        Some(3) => c.cookies_rx += 1,
        _ => {}
    }
    let reply = match sim.tunn.decapsulate(Some(from), datagram, out) {
        TunnResult::WriteToNetwork(p) => {
            let _ = sim.socket.send_to(p, daemon);
            // Packets queued while the handshake was under way.
            while let TunnResult::WriteToNetwork(p) = sim.tunn.decapsulate(None, &[], out) {
                let _ = sim.socket.send_to(p, daemon);
            }
            None
        }
        TunnResult::WriteToTunnelV4(p, _) => {
            c.decrypted += 1;
            echo_reply(p)
        }
        TunnResult::WriteToTunnelV6(..) => {
            c.decrypted += 1;
            None
        }
        TunnResult::Err(_) => {
            c.errors += 1;
            None
        }
        TunnResult::Done => None,
    };
    if let Some(reply) = reply
        && let TunnResult::WriteToNetwork(p) = sim.tunn.encapsulate(&reply, out)
    {
        sim.counters.echo_replies += 1;
        let _ = sim.socket.send_to(p, daemon);
    }
}

/// The ICMP echo reply to an IPv4 echo request `packet`, or `None` if it
/// is anything else: addresses swapped (the header checksum stays valid),
/// type 0, the ICMP checksum computed anew.
pub(crate) fn echo_reply(packet: &[u8]) -> Option<Vec<u8>> {
    let ihl = usize::from(packet.first()? & 0x0f) * 4;
    if packet[0] >> 4 != 4 || ihl < 20 || packet.len() < ihl + 8 || packet[9] != 1 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    if total < ihl + 8 || total > packet.len() || packet[ihl] != 8 {
        return None;
    }
    let mut reply = packet[..total].to_vec();
    let (src, dst) = (packet[12..16].to_vec(), packet[16..20].to_vec());
    reply[12..16].copy_from_slice(&dst);
    reply[16..20].copy_from_slice(&src);
    reply[ihl] = 0;
    reply[ihl + 2..ihl + 4].fill(0);
    let sum = internet_checksum(&reply[ihl..]);
    reply[ihl + 2..ihl + 4].copy_from_slice(&sum.to_be_bytes());
    Some(reply)
}

/// RFC 1071.
pub(crate) fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo_request() -> Vec<u8> {
        let mut p = vec![
            0x45, 0, 0, 36, 0x12, 0x34, 0x40, 0, 64, 1, 0, 0, 10, 1, 0, 2, 10, 100, 7, 1,
        ];
        p.extend_from_slice(&[8, 0, 0, 0, 0xab, 0xcd, 0, 1]);
        p.extend_from_slice(b"cw-wide!");
        let ip = internet_checksum(&p[..20]);
        p[10..12].copy_from_slice(&ip.to_be_bytes());
        let icmp = internet_checksum(&p[20..]);
        p[22..24].copy_from_slice(&icmp.to_be_bytes());
        p
    }

    #[test]
    fn an_echo_request_gets_a_valid_reply() {
        let reply = echo_reply(&echo_request()).expect("a reply");
        assert_eq!(&reply[12..16], &[10, 100, 7, 1]);
        assert_eq!(&reply[16..20], &[10, 1, 0, 2]);
        assert_eq!(reply[20], 0, "echo reply");
        assert_eq!(
            &reply[24..28],
            &[0xab, 0xcd, 0, 1],
            "identifier and sequence kept"
        );
        assert_eq!(internet_checksum(&reply[..20]), 0, "IPv4 header checksum");
        assert_eq!(internet_checksum(&reply[20..]), 0, "ICMP checksum");
    }

    #[test]
    fn anything_else_gets_no_reply() {
        let mut reply = echo_request();
        reply[20] = 0;
        assert_eq!(echo_reply(&reply), None, "a reply is not answered");
        let mut udp = echo_request();
        udp[9] = 17;
        assert_eq!(echo_reply(&udp), None);
        assert_eq!(echo_reply(&echo_request()[..24]), None, "truncated");
        assert_eq!(echo_reply(&[0x60; 48]), None, "IPv6");
    }

    #[test]
    fn a_peer_completes_a_handshake_with_boringtun() {
        // The worker's per-peer logic against a plain boringtun responder.
        let (a, b) = (keys::generate(), keys::generate());
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let mut sim = Sim {
            socket,
            tunn: Tunn::new(
                a.clone(),
                x25519_dalek::PublicKey::from(&b),
                None,
                None,
                1,
                None,
            ),
            counters: SimCounters::default(),
            epoch: Instant::now(),
        };
        let mut daemon = Tunn::new(b, x25519_dalek::PublicKey::from(&a), None, None, 2, None);
        let peer = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let to = peer.local_addr().expect("addr");
        let (mut out, mut dout) = (vec![0u8; BUF], vec![0u8; BUF]);
        let TunnResult::WriteToNetwork(init) =
            sim.tunn.format_handshake_initiation(&mut out, false)
        else {
            panic!("no initiation");
        };
        let TunnResult::WriteToNetwork(resp) = daemon.decapsulate(None, init, &mut dout) else {
            panic!("no response");
        };
        let resp = resp.to_vec();
        handle(&mut sim, to.ip(), &resp, to, &mut out);
        assert_eq!(sim.counters.responses_rx, 1);
        assert!(sim.counters.response_ms.is_some() && sim.counters.initiation_ms.is_none());
        // The sim sent its first data (a keepalive) to confirm; the daemon
        // side now sends an echo request and gets the reply.
        let mut buf = [0u8; 2048];
        let (len, _) = peer.recv_from(&mut buf).expect("keepalive");
        assert!(matches!(
            daemon.decapsulate(None, &buf[..len], &mut dout),
            TunnResult::Done
        ));
        let TunnResult::WriteToNetwork(data) = daemon.encapsulate(&echo_request(), &mut dout)
        else {
            panic!("no data");
        };
        let data = data.to_vec();
        handle(&mut sim, to.ip(), &data, to, &mut out);
        assert_eq!((sim.counters.decrypted, sim.counters.echo_replies), (1, 1));
        let (len, _) = peer.recv_from(&mut buf).expect("echo reply");
        let TunnResult::WriteToTunnelV4(reply, _) =
            daemon.decapsulate(None, &buf[..len], &mut dout)
        else {
            panic!("the reply does not decrypt");
        };
        assert_eq!(reply[20], 0);
    }
}
