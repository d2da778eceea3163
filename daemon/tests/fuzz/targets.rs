//! Fuzz targets of the daemon's parsers of untrusted input: each takes
//! bytes, panics when a property fails, and returns whether the input was
//! accepted. `daemon/tests/fuzz.rs` (the in-suite pass) and the cargo-fuzz
//! project (`fuzz/`) include this file.

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use boringtun::noise::{Tunn, TunnResult};
use causeway::config::{self, PeerConfig};
use causeway::core::{DropReason, Io, Peer, Site, SiteParams, Source};
use causeway::invite::Invite;
use causeway::packet::{
    self, AllowRule, Proto, View, allowed, clamp_mss, too_big_reply, translate_dst, translate_src,
};
use ipnet::IpNet;
use x25519_dalek::{PublicKey, StaticSecret};

fn net(s: &str) -> IpNet {
    s.parse().expect("CIDR")
}

/// The peer's real networks and this site's views of them.
pub(crate) const REAL_V4: &str = "10.1.0.0/16";
pub(crate) const VIEW_V4: &str = "100.64.0.0/16";
pub(crate) const REAL_V6: &str = "fd00:1::/64";
pub(crate) const VIEW_V6: &str = "fd63:6175:7365::/64";
/// This site's pod networks.
pub(crate) const POD_V4: &str = "10.0.0.0/16";
pub(crate) const POD_V6: &str = "fd00::/64";

fn views() -> [View; 2] {
    [
        View::new(net(REAL_V4), net(VIEW_V4)).expect("view"),
        View::new(net(REAL_V6), net(VIEW_V6)).expect("view"),
    ]
}

/// One IP packet (first byte: MTU and MSS selector, the rest the packet):
/// parsing, remapping both ways, the MSS clamp, the ICMP too-big reply and
/// the allow-list never panic. Properties: a packet translated and
/// translated back is the packet again; a translated packet still parses,
/// to the same summary with the moved address; clamping twice changes
/// nothing the first clamp did not; a too-big reply is a parseable ICMP
/// error that fits its buffer.
pub(crate) fn packet(data: &[u8]) -> bool {
    let Some((&knob, original)) = data.split_first() else {
        return false;
    };
    let summary = packet::parse(original);
    for v in views() {
        for egress in [true, false] {
            let (from, to) = if egress {
                (v.view(), v.real())
            } else {
                (v.real(), v.view())
            };
            let translate = if egress { translate_dst } else { translate_src };
            let mut p = original.to_vec();
            let result = if egress {
                v.egress(&mut p)
            } else {
                v.ingress(&mut p)
            };
            match (&summary, result) {
                (Err(e), r) => assert_eq!(r, Err(*e), "translation of an unparseable packet"),
                (Ok(_), Err(e)) => panic!("parsed, but translation failed: {e}"),
                (Ok(_), Ok(false)) => assert_eq!(p, original, "untranslated packet changed"),
                (Ok(before), Ok(true)) => {
                    let after = packet::parse(&p).expect("translated packet parses");
                    let (moved, kept) = if egress {
                        ((before.dst, after.dst), (before.src, after.src))
                    } else {
                        ((before.src, after.src), (before.dst, after.dst))
                    };
                    assert!(
                        from.contains(&moved.0) && to.contains(&moved.1),
                        "{moved:?}"
                    );
                    assert_eq!(kept.0, kept.1);
                    assert_eq!(
                        (before.protocol, before.src_port, before.dst_port),
                        (after.protocol, after.src_port, after.dst_port)
                    );
                    assert_eq!(translate(&mut p, to, from), Ok(true), "reverse translation");
                    // The reverse is exact unless an ICMP error quotes an
                    // address that was in the target prefix already (the
                    // reverse then moves it too): those are skipped.
                    if !(before.is_icmp_error() && quotes_prefix(original, to)) {
                        assert_same_but_negative_zero(&p, original);
                    }
                }
            }
        }
    }
    let Ok(summary) = summary else {
        return false;
    };
    // The MSS clamp: the second clamp finds nothing to do.
    let mss = 536 + u16::from(knob) * 4;
    let mut p = original.to_vec();
    let changed = clamp_mss(&mut p, mss);
    assert_eq!(changed, p != original, "clamp_mss said {changed}");
    let once = p.clone();
    assert!(!clamp_mss(&mut p, mss), "second clamp changed the packet");
    assert_eq!(p, once);
    assert_eq!(packet::parse(&p).map(|s| s.dst), Ok(summary.dst));
    // The too-big reply.
    let mtu = 576 + u16::from(knob) * 32;
    let mut out = [0u8; 1280];
    if let Some(n) = too_big_reply(original, mtu, &mut out) {
        assert!(n <= out.len());
        let reply = packet::parse(&out[..n]).expect("too-big reply parses");
        assert!(reply.is_icmp_error(), "{reply:?}");
        assert_eq!((reply.src, reply.dst), (summary.dst, summary.src));
    }
    // The allow-list.
    let rules = [
        AllowRule::any(net(POD_V4)),
        AllowRule {
            cidr: net(POD_V6),
            proto: Proto::Tcp,
            ports: Some(80..=443),
        },
    ];
    let _ = allowed(&rules, &summary).is_allowed();
    let _ = allowed(&[], &summary).is_allowed();
    true
}

/// Whether the bytes after the outer IP header hold the network bytes of
/// `prefix` (a /16 or /64: whole bytes) anywhere.
fn quotes_prefix(packet: &[u8], prefix: &IpNet) -> bool {
    let (skip, bytes) = match prefix {
        IpNet::V4(n) => (20, n.network().octets()[..2].to_vec()),
        IpNet::V6(n) => (40, n.network().octets()[..8].to_vec()),
    };
    packet
        .get(skip..)
        .is_some_and(|rest| rest.windows(bytes.len()).any(|w| w == bytes))
}

/// `after` is `before` again, except that a checksum word of `0xffff`
/// (negative zero: never computed, so only in a packet that came with a
/// wrong checksum) may have become the equivalent `0x0000`: incremental
/// updates (RFC 1624 eqn. 3) normalize it.
fn assert_same_but_negative_zero(after: &[u8], before: &[u8]) {
    assert_eq!(after.len(), before.len());
    let words = before.chunks(2).zip(after.chunks(2));
    for (i, (b, a)) in words.enumerate() {
        assert!(
            a == b || (b == [0xff, 0xff] && a == [0, 0]),
            "translate then reverse changed bytes {}..{}: {b:02x?} -> {a:02x?}",
            2 * i,
            2 * i + 2
        );
    }
}

/// An invite token: the first byte picks the layer (even: the token text
/// as given; odd: the rest is the JSON, wrapped in a well-formed token).
/// Decoding never panics; an accepted token's invite encodes to a token
/// that decodes to the same invite.
pub(crate) fn invite(data: &[u8]) -> bool {
    let Some((&layer, rest)) = data.split_first() else {
        return false;
    };
    let token = if layer % 2 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        format!("cw1.{}", URL_SAFE_NO_PAD.encode(rest))
    };
    let Ok(invite) = Invite::decode(&token) else {
        return false;
    };
    assert_eq!(Invite::decode(&invite.encode()), Ok(invite));
    true
}

/// A config file: parsing never panics; an accepted config, rewritten by
/// the TOML library (other layout, same values), parses to the same config.
pub(crate) fn config(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let Ok(parsed) = config::parse(text, "fuzz.toml") else {
        return false;
    };
    let value: toml::Value = toml::from_str(text).expect("accepted config is TOML");
    let rewritten = toml::to_string(&value).expect("TOML value renders");
    let again = config::parse(&rewritten, "fuzz.toml")
        .unwrap_or_else(|e| panic!("rewritten config refused: {e}\n{rewritten}"));
    assert_eq!(format!("{again:?}"), format!("{parsed:?}"));
    true
}

/// UAPI requests: reading never panics; the outcomes are whole requests
/// followed by exactly one end; a `get` took exactly `get=1\n\n`, a `set`
/// started with `set=1\n`, ended with an empty line, named only valid keys
/// and stayed within the request limit; nothing was read past the input.
pub(crate) fn uapi(data: &[u8]) -> bool {
    let outcomes = causeway::observe::fuzz_uapi_requests(data);
    let (last, requests) = outcomes.split_last().expect("at least the end");
    let mut next = 0;
    let mut any = false;
    for (what, span) in requests {
        assert_eq!(span.start, next, "requests are contiguous");
        next = span.end;
        let bytes = &data[span.clone()];
        if what == "get" {
            assert_eq!(bytes, b"get=1\n\n");
        } else {
            let keys = what.strip_prefix("set ").expect("get or set");
            assert!(bytes.starts_with(b"set=1\n") && bytes.ends_with(b"\n\n"));
            assert!(bytes.len() <= 6 + (4 << 20) + 1, "{}", bytes.len());
            assert!(
                keys.split(',')
                    .filter(|k| !k.is_empty())
                    .all(|k| k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
            );
        }
        any = true;
    }
    let (what, span) = last;
    assert_eq!(span.start, next);
    assert!(span.end <= data.len());
    assert!(
        what == "closed" || what == "gone" || what.starts_with("invalid "),
        "{what}"
    );
    if what == "closed" {
        assert_eq!(span.end, data.len(), "closed with bytes left");
    }
    any
}

/// What the core sent, counted.
#[derive(Default)]
pub(crate) struct Sink {
    pub(crate) sent: Vec<Vec<u8>>,
}

impl Io for Sink {
    fn send(&mut self, _to: SocketAddr, bytes: &[u8]) -> std::io::Result<()> {
        self.sent.push(bytes.to_vec());
        Ok(())
    }
    fn send_with_ttl(&mut self, to: SocketAddr, bytes: &[u8], _ttl: u8) -> std::io::Result<()> {
        self.send(to, bytes)
    }
    fn relay(&mut self, _peer: &Arc<Peer>, bytes: &[u8]) -> bool {
        self.sent.push(bytes.to_vec());
        true
    }
    fn publish_candidates(&mut self, _candidates: &[SocketAddr]) {}
}

pub(crate) const SITE_SECRET: [u8; 32] = [0x11; 32];
pub(crate) const PEER_SECRET: [u8; 32] = [0x22; 32];
pub(crate) const PEER_ADDR: ([u8; 4], u16) = ([192, 0, 2, 2], 51820);

/// A site with one peer (remapped views, default allow-list).
pub(crate) fn site(now: Instant) -> Site {
    let peer = PeerConfig {
        name: "peer".into(),
        public_key: PublicKey::from(&StaticSecret::from(PEER_SECRET)),
        cidrs: vec![net(REAL_V4), net(REAL_V6)],
        views: views().to_vec(),
        allow: Vec::new(),
        endpoint: Some(config::Endpoint {
            spec: "192.0.2.2:51820".into(),
            addr: SocketAddr::from(PEER_ADDR),
        }),
        persistent_keepalive: None,
    };
    Site::new(
        SiteParams {
            private_key: StaticSecret::from(SITE_SECRET),
            pod_cidrs: vec![net(POD_V4), net(POD_V6)],
            mtu: 1420,
            traversal: None,
            seed: 7,
            role: causeway::core::Role::Active,
        },
        &[peer],
        now,
    )
}

/// Every drop counted so far, the site's and its peers'.
pub(crate) fn drops(site: &Site) -> u64 {
    let peers = site.peers();
    DropReason::ALL
        .iter()
        .map(|&r| site.drops.get(r) + peers.iter().map(|p| p.counters.drops.get(r)).sum::<u64>())
        .sum()
}

thread_local! {
    static OUTER: Site = site(Instant::now());
}

/// A datagram on the WireGuard socket, from the peer's address or another:
/// the core never panics and never delivers it; each one is either counted
/// as exactly one drop or answered (a handshake or cookie reply).
pub(crate) fn wireguard_datagram(data: &[u8]) -> bool {
    let Some((&from, datagram)) = data.split_first() else {
        return false;
    };
    OUTER.with(|site| {
        let source = match from % 3 {
            0 => Source::Udp(SocketAddr::from(PEER_ADDR)),
            1 => Source::Udp(SocketAddr::from(([198, 51, 100, from], 4500))),
            _ => Source::Relay(u32::from(from)),
        };
        let before = drops(site);
        let mut io = Sink::default();
        let mut out = vec![0u8; 65536];
        let peers = site.peers();
        let got = site.decapsulate(Instant::now(), &peers, source, datagram, &mut out, &mut io);
        let dropped = drops(site) - before;
        assert_eq!(got, None, "a fuzzed datagram was delivered");
        assert!(
            dropped == 1 || (dropped == 0 && !io.sent.is_empty()),
            "{dropped} drops, {} replies",
            io.sent.len()
        );
        dropped == 0
    })
}

/// A site and the peer's own WireGuard end, with a session up.
pub(crate) struct Pair {
    pub(crate) site: Site,
    pub(crate) peer: Tunn,
}

impl Pair {
    pub(crate) fn new() -> Pair {
        let now = Instant::now();
        let site = site(now);
        let mut peer = Tunn::new(
            StaticSecret::from(PEER_SECRET),
            PublicKey::from(&StaticSecret::from(SITE_SECRET)),
            None,
            None,
            7,
            None,
        );
        let mut buf = vec![0u8; 2048];
        let mut out = vec![0u8; 2048];
        let TunnResult::WriteToNetwork(init) = peer.format_handshake_initiation(&mut buf, false)
        else {
            panic!("no handshake initiation");
        };
        let init = init.to_vec();
        let mut io = Sink::default();
        let peers = site.peers();
        let from = Source::Udp(SocketAddr::from(PEER_ADDR));
        site.decapsulate(now, &peers, from, &init, &mut out, &mut io);
        let response = io.sent.pop().expect("handshake response");
        // The peer confirms the session with a keepalive.
        if let TunnResult::WriteToNetwork(keepalive) = peer.decapsulate(None, &response, &mut buf) {
            let keepalive = keepalive.to_vec();
            site.decapsulate(now, &peers, from, &keepalive, &mut out, &mut io);
        }
        drop(peers);
        Pair { site, peer }
    }
}

thread_local! {
    static INNER: RefCell<Option<Pair>> = const { RefCell::new(None) };
}

/// An inner packet from an authenticated peer (encrypted by the peer's own
/// boringtun, through the whole receive path: source check, parse, remap,
/// export and allow-list checks, MSS clamp). Never panics; either the
/// packet is delivered (and then its source is in the peer's view, its
/// destination in our pod networks, and it parses) or exactly one drop is
/// counted; an empty packet is a keepalive.
pub(crate) fn inner_packet(data: &[u8]) -> bool {
    INNER.with(|pair| {
        let mut pair = pair.borrow_mut();
        let mut buf = vec![0u8; data.len() + 64];
        // A new session when there is none or boringtun wants a new handshake.
        for _ in 0..2 {
            let p = pair.get_or_insert_with(Pair::new);
            if let TunnResult::WriteToNetwork(d) = p.peer.encapsulate(data, &mut buf)
                && d.first() == Some(&4)
            {
                let datagram = d.to_vec();
                return deliver(&p.site, &datagram, data);
            }
            *pair = None;
        }
        panic!("no WireGuard session with the peer");
    })
}

fn deliver(site: &Site, datagram: &[u8], inner: &[u8]) -> bool {
    let before = drops(site);
    let peers = site.peers();
    let rx_before = peers
        .get(0)
        .counters
        .rx_packets
        .load(std::sync::atomic::Ordering::Relaxed);
    let mut io = Sink::default();
    let mut out = vec![0u8; 65536];
    let from = Source::Udp(SocketAddr::from(PEER_ADDR));
    let got = site.decapsulate(Instant::now(), &peers, from, datagram, &mut out, &mut io);
    let dropped = drops(site) - before;
    let rx = peers
        .get(0)
        .counters
        .rx_packets
        .load(std::sync::atomic::Ordering::Relaxed)
        - rx_before;
    match got {
        Some(n) => {
            assert_eq!((dropped, rx), (0, 1));
            let s = packet::parse(&out[..n]).expect("delivered packet parses");
            assert!(
                [VIEW_V4, VIEW_V6].iter().any(|v| net(v).contains(&s.src)),
                "source {} outside the views",
                s.src
            );
            assert!(
                [POD_V4, POD_V6].iter().any(|v| net(v).contains(&s.dst)),
                "destination {} outside the pods",
                s.dst
            );
            true
        }
        None if inner.is_empty() => {
            assert_eq!((dropped, rx), (0, 0), "keepalive");
            false
        }
        None => {
            assert_eq!((dropped, rx), (1, 0), "{} bytes", inner.len());
            false
        }
    }
}

/// Addresses the generators pick from: the peer's, the views, the pods.
pub(crate) fn addresses() -> Vec<IpAddr> {
    [
        "10.1.2.3",
        "100.64.2.3",
        "10.0.0.9",
        "192.0.2.1",
        "fd00:1::5",
        "fd63:6175:7365::5",
        "fd00::9",
        "2001:db8::1",
    ]
    .iter()
    .map(|a| a.parse().expect("address"))
    .collect()
}
