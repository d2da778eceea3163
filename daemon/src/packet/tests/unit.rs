//! Unit tests: parsing, ICMP errors, fragments, MSS option layouts, "too
//! big" replies, policy verdicts, and malformed input for every function.

use std::net::IpAddr;

use ipnet::IpNet;

use super::build::{Ext, L4, Spec, fragment, reassemble, set_v4_checksum, verify};
use crate::packet::{
    AllowReason, AllowRule, DenyReason, Fragment, IpVersion, PacketError, Proto, Verdict, View,
    ViewError, allowed, clamp_mss, max_mss, parse, tcp_flags, too_big_reply, translate_dst,
    translate_src,
};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn spec(src: &str, dst: &str, l4: L4) -> Spec {
    Spec {
        src: ip(src),
        dst: ip(dst),
        ttl: 64,
        id: 0x4242,
        df: false,
        v4_options: Vec::new(),
        ext: Vec::new(),
        l4,
    }
}

fn tcp(flags: u8, options: &[u8], payload: &[u8]) -> L4 {
    L4::Tcp {
        src_port: 40000,
        dst_port: 443,
        seq: 0x0102_0304,
        flags,
        options: options.to_vec(),
        payload: payload.to_vec(),
    }
}

fn udp(payload: &[u8]) -> L4 {
    L4::Udp {
        src_port: 5353,
        dst_port: 53,
        payload: payload.to_vec(),
        no_checksum: false,
    }
}

fn icmp(icmp_type: u8, code: u8, rest: [u8; 4], payload: Vec<u8>) -> L4 {
    L4::Icmp {
        icmp_type,
        code,
        rest,
        payload,
    }
}

fn dest_opts() -> Ext {
    Ext::DestOpts(vec![1, 4, 0, 0, 0, 0])
}

fn hop_by_hop() -> Ext {
    Ext::HopByHop(vec![1, 4, 0, 0, 0, 0])
}

// ---------------------------------------------------------------- parse --

#[test]
fn parse_v4_tcp() {
    let p = spec(
        "10.0.2.7",
        "10.0.1.5",
        tcp(tcp_flags::SYN, &[2, 4, 5, 0xb4], b"hi"),
    )
    .build();
    let s = parse(&p).unwrap();
    assert_eq!(s.version, IpVersion::V4);
    assert_eq!(s.src, ip("10.0.2.7"));
    assert_eq!(s.dst, ip("10.0.1.5"));
    assert_eq!(s.protocol, 6);
    assert_eq!(s.fragment, Fragment::Whole);
    assert!(!s.is_fragment());
    assert_eq!(s.len, p.len());
    assert_eq!(s.l4_offset, Some(20));
    assert_eq!(s.tcp_flags, Some(tcp_flags::SYN));
    assert!(s.is_tcp_syn());
    assert_eq!((s.src_port, s.dst_port), (Some(40000), Some(443)));
    assert_eq!((s.icmp_type, s.icmp_code), (None, None));
}

#[test]
fn parse_v6_walks_extension_headers() {
    let mut s6 = spec("fd00:10::7", "fd00:20::5", udp(b"query"));
    s6.ext = vec![hop_by_hop(), Ext::Routing(vec![0; 14]), dest_opts()];
    let p = s6.build();
    let s = parse(&p).unwrap();
    assert_eq!(s.version, IpVersion::V6);
    assert_eq!(s.protocol, 17);
    assert_eq!(s.l4_offset, Some(40 + 8 + 16 + 8));
    assert_eq!((s.src_port, s.dst_port), (Some(5353), Some(53)));
    assert_eq!(s.fragment, Fragment::Whole);
}

#[test]
fn parse_icmp_type_and_code() {
    let p = spec("10.0.0.1", "10.0.0.2", icmp(8, 0, [0, 1, 0, 2], vec![0; 8])).build();
    let s = parse(&p).unwrap();
    assert_eq!(
        (s.protocol, s.icmp_type, s.icmp_code),
        (1, Some(8), Some(0))
    );
    assert!(!s.is_icmp_error());
    let p = spec("fd00::1", "fd00::2", icmp(1, 4, [0; 4], vec![0; 8])).build();
    let s = parse(&p).unwrap();
    assert_eq!(
        (s.protocol, s.icmp_type, s.icmp_code),
        (58, Some(1), Some(4))
    );
    assert!(s.is_icmp_error());
    assert_eq!(s.src_port, None);
}

#[test]
fn parse_rejects_malformed_packets() {
    let good4 = spec("10.0.0.1", "10.0.0.2", tcp(0x10, &[], b"")).build();
    let good6 = spec("fd00::1", "fd00::2", udp(b"")).build();
    let with = |base: &[u8], f: &dyn Fn(&mut Vec<u8>)| {
        let mut p = base.to_vec();
        f(&mut p);
        p
    };
    let cases: Vec<(&str, Vec<u8>, PacketError)> = vec![
        ("empty", vec![], PacketError::Truncated),
        ("short v4", good4[..19].to_vec(), PacketError::Truncated),
        ("short v6", good6[..39].to_vec(), PacketError::Truncated),
        (
            "version 5",
            with(&good4, &|p| p[0] = 0x55),
            PacketError::BadVersion,
        ),
        ("version 0", vec![0; 60], PacketError::BadVersion),
        (
            "IHL 4",
            with(&good4, &|p| p[0] = 0x44),
            PacketError::BadHeaderLength,
        ),
        (
            "IHL past buffer",
            with(&good4, &|p| p[0] = 0x4f),
            PacketError::Truncated,
        ),
        (
            "total length past buffer",
            with(&good4, &|p| p[2..4].copy_from_slice(&100u16.to_be_bytes())),
            PacketError::BadTotalLength,
        ),
        (
            "total length below header",
            with(&good4, &|p| p[2..4].copy_from_slice(&19u16.to_be_bytes())),
            PacketError::BadTotalLength,
        ),
        (
            "payload length past buffer",
            with(&good6, &|p| p[4..6].copy_from_slice(&9u16.to_be_bytes())),
            PacketError::BadTotalLength,
        ),
        (
            "TCP header cut",
            with(&good4, &|p| {
                p.truncate(30);
                p[2..4].copy_from_slice(&30u16.to_be_bytes());
            }),
            PacketError::TruncatedTransport,
        ),
        (
            "TCP data offset 4",
            with(&good4, &|p| p[32] = 0x40),
            PacketError::BadTcpDataOffset,
        ),
        (
            "TCP data offset past end",
            with(&good4, &|p| p[32] = 0xf0),
            PacketError::TruncatedTransport,
        ),
        (
            "UDP header cut",
            with(&good6, &|p| {
                p.truncate(44);
                p[4..6].copy_from_slice(&4u16.to_be_bytes());
            }),
            PacketError::TruncatedTransport,
        ),
    ];
    for (name, packet, error) in cases {
        assert_eq!(parse(&packet), Err(error), "{name}");
    }
}

#[test]
fn parse_rejects_bad_extension_chains() {
    // A destination-options header whose length runs past the packet.
    let mut s6 = spec("fd00::1", "fd00::2", udp(b""));
    s6.ext = vec![dest_opts()];
    let mut p = s6.build();
    p[41] = 5;
    assert_eq!(parse(&p), Err(PacketError::BadExtensionHeader));
    // Nine destination-options headers.
    s6.ext = vec![dest_opts(); 9];
    assert_eq!(
        parse(&s6.build()),
        Err(PacketError::TooManyExtensionHeaders)
    );
    s6.ext = vec![dest_opts(); 8];
    assert!(parse(&s6.build()).is_ok());
    // Next header says "fragment" but the packet ends within it.
    let mut p = spec("fd00::1", "fd00::2", udp(b"")).build();
    p[6] = 44;
    p.truncate(44);
    p[4..6].copy_from_slice(&4u16.to_be_bytes());
    assert_eq!(parse(&p), Err(PacketError::BadExtensionHeader));
}

#[test]
fn parse_rejects_fragments_overlapping_the_tcp_header() {
    // RFC 1858: a fragment at offset 8 could rewrite the TCP flags.
    let p = spec("10.0.0.1", "10.0.0.2", tcp(0x02, &[], &[0; 40])).build();
    let mut later = fragment(&p, 20, &[8])[1].clone();
    assert_eq!(parse(&later), Err(PacketError::TinyFragment));
    later[6..8].copy_from_slice(&3u16.to_be_bytes());
    set_v4_checksum(&mut later);
    assert!(parse(&later).is_ok());

    let p = spec("fd00::1", "fd00::2", tcp(0x02, &[], &[0; 40])).build();
    let frags = fragment(&p, 40, &[16]);
    assert_eq!(parse(&frags[1]), Err(PacketError::TinyFragment));
    // A first fragment must hold the whole TCP header.
    assert_eq!(parse(&frags[0]), Err(PacketError::TruncatedTransport));
}

#[test]
fn parse_ignores_bytes_past_the_packet() {
    let mut p = spec("10.0.0.1", "10.0.0.2", udp(b"x")).build();
    let len = p.len();
    p.extend_from_slice(&[0xee; 7]);
    assert_eq!(parse(&p).unwrap().len, len);
    let before = p.clone();
    assert!(translate_dst(&mut p, &net("10.0.0.0/24"), &net("100.64.0.0/24")).unwrap());
    assert_eq!(&p[len..], &before[len..]);
    verify(&p[..len]).unwrap();
}

/// Every function on every prefix of several valid packets, and with every
/// single byte flipped: no panic; a cut packet never parses as whole.
#[test]
fn truncated_and_corrupted_packets_never_panic() {
    let inner = spec("10.0.2.7", "10.0.1.5", tcp(0x02, &[2, 4, 5, 0xb4], b"abc")).build();
    let mut v6 = spec(
        "fd00:10::7",
        "fd00:20::5",
        tcp(0x12, &[1, 2, 4, 5, 0xa0, 0, 0, 0], b""),
    );
    v6.ext = vec![hop_by_hop(), dest_opts()];
    let v6 = v6.build();
    let mut packets = vec![
        inner.clone(),
        spec("10.0.1.5", "10.0.2.7", icmp(3, 3, [0; 4], inner)).build(),
        spec(
            "fd00:20::5",
            "fd00:10::7",
            icmp(2, 0, [0, 0, 5, 0], v6.clone()),
        )
        .build(),
        v6,
    ];
    let big = spec("10.0.0.1", "10.0.0.2", udp(&[7; 300])).build();
    packets.extend(fragment(&big, 20, &[64]));
    let maps = [
        (net("10.0.0.0/8"), net("100.64.0.0/8")),
        (net("fd00::/16"), net("fd99::/16")),
        (net("10.0.0.0/8"), net("fd00::/8")),
    ];
    let mut out = [0u8; 1500];
    for packet in &packets {
        let full = parse(packet).unwrap();
        for n in 0..packet.len() {
            let cut = &packet[..n];
            if n < full.len {
                assert!(parse(cut).is_err(), "cut at {n} parsed");
            }
            let mut flipped = packet.clone();
            flipped[n] ^= 0xff;
            for candidate in [cut, &flipped[..]] {
                for (from, to) in &maps {
                    let mut b = candidate.to_vec();
                    let _ = translate_dst(&mut b, from, to);
                    let _ = translate_src(&mut b, from, to);
                }
                let mut b = candidate.to_vec();
                let _ = clamp_mss(&mut b, 1000);
                let _ = too_big_reply(candidate, 40, &mut out);
                let _ = too_big_reply(candidate, 40, &mut out[..30]);
                if let Ok(s) = parse(candidate) {
                    let _ = allowed(&[AllowRule::any(net("0.0.0.0/0"))], &s);
                }
            }
        }
    }
}

// ------------------------------------------------------------ mapping --

#[test]
fn mapping_validates_and_translates_both_ways() {
    assert_eq!(
        View::new(net("10.0.1.0/24"), net("fd00::/120")),
        Err(ViewError::FamilyMismatch {
            real: net("10.0.1.0/24"),
            view: net("fd00::/120"),
        })
    );
    assert_eq!(
        View::new(net("10.0.1.0/24"), net("100.64.0.0/16")),
        Err(ViewError::PrefixLengthMismatch {
            real: net("10.0.1.0/24"),
            view: net("100.64.0.0/16"),
        })
    );
    let m = View::new(net("10.0.1.9/24"), net("100.64.1.0/24")).unwrap();
    assert_eq!(m.real(), &net("10.0.1.0/24"));
    assert!(m.is_remapped());
    // Egress: a local pod sends to the view; the peer gets the real address.
    let mut p = spec("10.0.2.7", "100.64.1.5", udp(b"ping")).build();
    assert!(m.egress(&mut p).unwrap());
    assert_eq!(parse(&p).unwrap().dst, ip("10.0.1.5"));
    verify(&p).unwrap();
    // Ingress: the peer's reply comes from the real address; the pod sees
    // the view.
    let mut p = spec("10.0.1.5", "10.0.2.7", udp(b"pong")).build();
    assert!(m.ingress(&mut p).unwrap());
    assert_eq!(parse(&p).unwrap().src, ip("100.64.1.5"));
    verify(&p).unwrap();
    // Not from the peer's CIDR: untouched.
    let mut p = spec("10.0.3.5", "10.0.2.7", udp(b"pong")).build();
    let before = p.clone();
    assert!(!m.ingress(&mut p).unwrap());
    assert_eq!(p, before);
}

#[test]
fn translate_rejects_mismatched_prefixes_and_ignores_other_families() {
    let mut p = spec("10.0.0.1", "10.0.0.2", udp(b"")).build();
    assert_eq!(
        translate_dst(&mut p, &net("10.0.0.0/8"), &net("fd00::/8")),
        Err(PacketError::MismatchedPrefixes)
    );
    assert_eq!(
        translate_src(&mut p, &net("10.0.0.0/8"), &net("11.0.0.0/16")),
        Err(PacketError::MismatchedPrefixes)
    );
    assert_eq!(
        translate_dst(&mut p, &net("fd00::/8"), &net("fd99::/8")),
        Ok(false)
    );
    assert_eq!(
        translate_dst(&mut [0u8; 3], &net("fd00::/8"), &net("fd99::/8")),
        Err(PacketError::BadVersion)
    );
}

#[test]
fn udp_zero_checksum_stays_zero_and_computed_zero_becomes_ffff() {
    let (from, to) = (net("10.0.1.0/24"), net("100.64.1.0/24"));
    let mut s = spec("10.0.2.7", "10.0.1.5", udp(b"ab"));
    if let L4::Udp { no_checksum, .. } = &mut s.l4 {
        *no_checksum = true;
    }
    let mut p = s.build();
    assert!(translate_dst(&mut p, &from, &to).unwrap());
    assert_eq!(&p[26..28], &[0, 0]);
    verify(&p).unwrap();

    // Find a payload whose translated checksum computes to zero (sent as
    // 0xffff), and one whose original does.
    let mut hits = 0;
    for w in 0..=u16::MAX {
        let s = spec("10.0.2.7", "10.0.1.5", udp(&w.to_be_bytes()));
        let mut moved = s.clone();
        moved.dst = ip("100.64.1.5");
        let (orig, expected) = (s.build(), moved.build());
        if expected[26..28] == [0xff, 0xff] || orig[26..28] == [0xff, 0xff] {
            let mut p = orig.clone();
            assert!(translate_dst(&mut p, &from, &to).unwrap());
            assert_eq!(p, expected);
            assert!(translate_dst(&mut p, &to, &from).unwrap());
            assert_eq!(p, orig);
            hits += 1;
        }
    }
    assert_eq!(hits, 2);
}

#[test]
fn icmp_echo_checksums() {
    let (from, to) = (net("fd00:20::/64"), net("fd99:1::/64"));
    let mut p = spec(
        "fd00:10::7",
        "fd00:20::5",
        icmp(128, 0, [0, 1, 0, 1], b"ping".to_vec()),
    )
    .build();
    assert!(translate_dst(&mut p, &from, &to).unwrap());
    verify(&p).unwrap();
    // ICMPv4 has no pseudo-header: its checksum does not move.
    let (from, to) = (net("10.0.1.0/24"), net("100.64.1.0/24"));
    let mut p = spec(
        "10.0.2.7",
        "10.0.1.5",
        icmp(8, 0, [0, 1, 0, 1], b"ping".to_vec()),
    )
    .build();
    let before = p.clone();
    assert!(translate_dst(&mut p, &from, &to).unwrap());
    assert_eq!(&p[20..], &before[20..]);
    verify(&p).unwrap();
}

// --------------------------------------------------------- ICMP errors --

/// The site's view of the peer 10.0.1.0/24 is 100.64.1.0/24. A local pod
/// 10.0.2.7 sent UDP to 100.64.1.5 (egress rewrote it to 10.0.1.5); the
/// peer's pod answers "port unreachable" quoting what it received. On
/// ingress the outer source and the quoted destination become the view.
#[test]
fn v4_port_unreachable_quote_is_translated() {
    let (real, view) = (net("10.0.1.0/24"), net("100.64.1.0/24"));
    let sent = spec("10.0.2.7", "10.0.1.5", udp(b"hello"));
    let quote = sent.build();
    let mut p = spec("10.0.1.5", "10.0.2.7", icmp(3, 3, [0; 4], quote.clone())).build();
    assert!(translate_src(&mut p, &real, &view).unwrap());
    verify(&p).unwrap();
    let s = parse(&p).unwrap();
    assert_eq!(s.src, ip("100.64.1.5"));
    let q = &p[28..];
    assert_eq!(&q[12..16], &[10, 0, 2, 7], "quoted source untouched");
    assert_eq!(
        &q[16..20],
        &[100, 64, 1, 5],
        "quoted destination is the view"
    );
    // The whole quote is exactly the packet the pod sent.
    let mut as_sent = sent.clone();
    as_sent.dst = ip("100.64.1.5");
    assert_eq!(q, &as_sent.build()[..]);
    // And back.
    assert!(translate_src(&mut p, &view, &real).unwrap());
    assert_eq!(&p[28..], &quote[..]);
}

/// The classic RFC 792 quote: IP header + 8 bytes, so the quoted TCP
/// checksum is not there and must not be invented; the quoted IP header
/// checksum and the ICMP checksum are fixed.
#[test]
fn v4_time_exceeded_with_short_quote() {
    let (view, real) = (net("100.64.1.0/24"), net("10.0.1.0/24"));
    let mut sent = spec("10.0.2.7", "10.0.1.5", tcp(0x02, &[2, 4, 5, 0xb4], b""));
    sent.v4_options = vec![1, 1, 1, 0];
    let full = sent.build();
    let quote = full[..24 + 8].to_vec();
    let mut p = spec("10.0.1.1", "10.0.2.7", icmp(11, 0, [0; 4], quote.clone())).build();
    assert!(translate_src(&mut p, &real, &view).unwrap());
    verify(&p).unwrap();
    let q = &p[28..];
    assert_eq!(&q[16..20], &[100, 64, 1, 5]);
    assert_eq!(&q[24..], &quote[24..], "quoted TCP bytes unchanged");
    let h = etherparse::Ipv4HeaderSlice::from_slice(q).unwrap();
    assert_eq!(h.to_header().calc_header_checksum(), h.header_checksum());
}

/// An error sent *to* a translated destination quotes a packet sent *from*
/// it: the quoted source is translated with the same prefixes.
#[test]
fn v6_packet_too_big_quote_source_is_translated() {
    let (from, to) = (net("fd00:aa::/64"), net("fd00:20::/64"));
    let mut sent = spec("fd00:aa::5", "fd00:10::7", tcp(0x10, &[], &[9; 100]));
    sent.ext = vec![dest_opts()];
    let quote = sent.build();
    let mut p = spec(
        "fd00:10::1",
        "fd00:aa::5",
        icmp(2, 0, [0, 0, 5, 0x8c], quote),
    )
    .build();
    assert!(translate_dst(&mut p, &from, &to).unwrap());
    verify(&p).unwrap();
    let s = parse(&p).unwrap();
    assert_eq!(s.dst, ip("fd00:20::5"));
    let q = &p[48..];
    assert_eq!(&q[8..24], &ip_bytes("fd00:20::5"));
    assert_eq!(&q[24..40], &ip_bytes("fd00:10::7"));
}

fn ip_bytes(s: &str) -> Vec<u8> {
    match ip(s) {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

#[test]
fn v6_time_exceeded_with_truncated_quote_and_extension_headers() {
    let (from, to) = (net("fd00:20::/48"), net("fd77:1::/48"));
    let mut sent = spec("fd00:10::7", "fd00:20::5", udp(&[1; 200]));
    sent.ext = vec![hop_by_hop(), dest_opts()];
    let full = sent.build();
    for cut in [8, 39, 40, 55, 56, 61, 62, 63, 64, 100, full.len()] {
        let quote = full[..cut].to_vec();
        let mut p = spec(
            "fd00:20::1",
            "fd00:10::7",
            icmp(3, 0, [0; 4], quote.clone()),
        )
        .build();
        assert!(translate_src(&mut p, &from, &to).unwrap(), "cut {cut}");
        verify(&p).unwrap();
        let q = &p[48..];
        if cut >= 40 {
            assert_eq!(&q[24..40], &ip_bytes("fd77:1::5"), "cut {cut}");
        } else {
            assert_eq!(q, &quote[..], "cut {cut}");
        }
        assert!(translate_src(&mut p, &to, &from).unwrap());
        assert_eq!(&p[48..], &quote[..], "cut {cut}");
    }
}

#[test]
fn quote_outside_the_prefix_is_left_alone() {
    let (real, view) = (net("10.0.1.0/24"), net("100.64.1.0/24"));
    // The quoted destination is not in the peer's CIDR.
    let quote = spec("10.0.2.7", "192.168.9.9", udp(b"x")).build();
    let mut p = spec("10.0.1.5", "10.0.2.7", icmp(3, 1, [0; 4], quote.clone())).build();
    assert!(translate_src(&mut p, &real, &view).unwrap());
    assert_eq!(&p[28..], &quote[..]);
    verify(&p).unwrap();
    // A quote of the wrong IP version is not touched either.
    let quote = spec("fd00::1", "fd00::2", udp(b"x")).build();
    let mut p = spec("10.0.1.5", "10.0.2.7", icmp(3, 1, [0; 4], quote.clone())).build();
    assert!(translate_src(&mut p, &real, &view).unwrap());
    assert_eq!(&p[28..], &quote[..]);
    verify(&p).unwrap();
}

#[test]
fn nested_icmp_error_is_translated_one_level_only() {
    let (real, view) = (net("10.0.1.0/24"), net("100.64.1.0/24"));
    let innermost = spec("10.0.1.5", "10.0.2.7", udp(b"x")).build();
    let inner = spec(
        "10.0.2.7",
        "10.0.1.5",
        icmp(3, 3, [0; 4], innermost.clone()),
    )
    .build();
    let mut p = spec("10.0.1.5", "10.0.2.7", icmp(3, 3, [0; 4], inner)).build();
    assert!(translate_src(&mut p, &real, &view).unwrap());
    verify(&p).unwrap();
    assert_eq!(&p[28 + 16..28 + 20], &[100, 64, 1, 5]);
    // The quote's own quote keeps its real source.
    assert_eq!(&p[28 + 28..], &innermost[..]);
}

#[test]
fn quote_of_a_later_fragment_only_has_its_ip_header_translated() {
    let (real, view) = (net("10.0.1.0/24"), net("100.64.1.0/24"));
    let big = spec("10.0.2.7", "10.0.1.5", udp(&[3; 100])).build();
    let later = fragment(&big, 20, &[48])[1].clone();
    let mut p = spec("10.0.1.5", "10.0.2.7", icmp(11, 1, [0; 4], later.clone())).build();
    assert!(translate_src(&mut p, &real, &view).unwrap());
    verify(&p).unwrap();
    assert_eq!(&p[28 + 16..28 + 20], &[100, 64, 1, 5]);
    assert_eq!(&p[28 + 20..], &later[20..]);
}

#[test]
fn icmp_error_not_translated_when_outer_address_is_not() {
    let (real, view) = (net("10.0.1.0/24"), net("100.64.1.0/24"));
    let quote = spec("10.0.2.7", "10.0.1.5", udp(b"x")).build();
    let mut p = spec("10.9.9.9", "10.0.2.7", icmp(3, 3, [0; 4], quote)).build();
    let before = p.clone();
    assert!(!translate_src(&mut p, &real, &view).unwrap());
    assert_eq!(p, before);
}

// ------------------------------------------------------------ fragments --

#[test]
fn v4_fragments() {
    let (from, to) = (net("10.0.1.0/24"), net("100.64.1.0/24"));
    let mut sent = spec("10.0.2.7", "10.0.1.5", tcp(0x18, &[], &[5; 120]));
    sent.v4_options = vec![1, 1, 1, 1];
    let whole = sent.build();
    let frags = fragment(&whole, 24, &[40, 96]);
    assert_eq!(parse(&frags[0]).unwrap().fragment, Fragment::First);
    assert_eq!(parse(&frags[1]).unwrap().fragment, Fragment::Later);
    assert_eq!(parse(&frags[1]).unwrap().l4_offset, None);
    let mut out = Vec::new();
    for f in &frags {
        let mut f2 = f.clone();
        assert!(translate_dst(&mut f2, &from, &to).unwrap());
        etherparse::Ipv4HeaderSlice::from_slice(&f2).unwrap();
        let h = etherparse::Ipv4HeaderSlice::from_slice(&f2).unwrap();
        assert_eq!(h.to_header().calc_header_checksum(), h.header_checksum());
        assert_eq!(
            &f2[24..],
            if parse(f).unwrap().l4_offset.is_some() {
                &f2[24..]
            } else {
                &f[24..]
            }
        );
        out.push(f2);
    }
    // Later fragments: payload untouched.
    assert_eq!(&out[1][24..], &frags[1][24..]);
    assert_eq!(&out[2][24..], &frags[2][24..]);
    let re = reassemble(&out, 24);
    verify(&re).unwrap();
    assert_eq!(parse(&re).unwrap().dst, ip("100.64.1.5"));
}

#[test]
fn v6_fragments_with_extension_headers() {
    let (from, to) = (net("fd00:20::/64"), net("fd99::/64"));
    let mut sent = spec("fd00:10::7", "fd00:20::5", udp(&[6; 150]));
    sent.ext = vec![hop_by_hop(), dest_opts()];
    let whole = sent.build();
    let frags = fragment(&whole, 48, &[32, 104]);
    let s0 = parse(&frags[0]).unwrap();
    assert_eq!(s0.fragment, Fragment::First);
    assert_eq!(s0.protocol, 17);
    assert_eq!(s0.l4_offset, Some(40 + 8 + 8 + 8));
    let s1 = parse(&frags[1]).unwrap();
    assert_eq!(s1.fragment, Fragment::Later);
    assert_eq!(
        s1.protocol, 60,
        "later fragment reports the fragment header's next header"
    );
    let mut out = Vec::new();
    for f in &frags {
        let mut f2 = f.clone();
        assert!(translate_dst(&mut f2, &from, &to).unwrap());
        out.push(f2);
    }
    assert_eq!(&out[1][40..], &frags[1][40..]);
    let re = reassemble(&out, 48);
    verify(&re).unwrap();
    // An atomic fragment (offset 0, no more) is a whole packet.
    let atomic = fragment(&whole, 48, &[]);
    assert_eq!(parse(&atomic[0]).unwrap().fragment, Fragment::Whole);
}

// ------------------------------------------------------------------ MSS --

fn syn(v6: bool, flags: u8, options: &[u8]) -> (Vec<u8>, usize) {
    let s = if v6 {
        spec("fd00::1", "fd00::2", tcp(flags, options, b""))
    } else {
        spec("10.0.0.1", "10.0.0.2", tcp(flags, options, b""))
    };
    (s.build(), s.l4_offset() + 20)
}

#[test]
fn mss_clamped_in_any_option_position() {
    const SYN: u8 = tcp_flags::SYN;
    const SYN_ACK: u8 = tcp_flags::SYN | tcp_flags::ACK;
    let ts = [8, 10, 1, 2, 3, 4, 5, 6, 7, 8];
    // (name, options, offset of the MSS value if it should be clamped)
    let layouts: Vec<(&str, Vec<u8>, Option<usize>)> = vec![
        ("MSS first", vec![2, 4, 0x05, 0xb4], Some(2)),
        (
            "after one NOP (odd offset)",
            vec![1, 2, 4, 0x05, 0xb4, 1, 1, 1],
            Some(3),
        ),
        (
            "after three NOPs",
            vec![1, 1, 1, 2, 4, 0x05, 0xb4, 0],
            Some(5),
        ),
        (
            "after SACK-permitted, timestamps, window scale",
            [&[4u8, 2][..], &ts, &[3, 3, 7], &[2, 4, 0x23, 0x28], &[0]].concat(),
            Some(17),
        ),
        (
            "MSS last",
            [
                &[1u8, 3, 3, 7, 4, 2, 1, 1][..],
                &[1, 1, 1, 1, 2, 4, 0xff, 0xff],
            ]
            .concat(),
            Some(14),
        ),
        (
            "malformed length 0 before MSS",
            vec![5, 0, 2, 4, 0x05, 0xb4, 0, 0],
            None,
        ),
        (
            "malformed length 1 before MSS",
            vec![5, 1, 2, 4, 0x05, 0xb4, 0, 0],
            None,
        ),
        (
            "length past the header",
            vec![5, 9, 2, 4, 0x05, 0xb4, 0, 0],
            None,
        ),
        ("EOL before MSS", vec![0, 0, 0, 0, 2, 4, 0x05, 0xb4], None),
        (
            "MSS with wrong length",
            vec![2, 3, 0x05, 0, 0, 0, 0, 0],
            None,
        ),
        ("MSS already small", vec![2, 4, 0x01, 0x00], None),
        ("no options", vec![], None),
    ];
    for v6 in [false, true] {
        for flags in [SYN, SYN_ACK] {
            for (name, options, at) in &layouts {
                let (original, opts) = syn(v6, flags, options);
                let mut p = original.clone();
                let changed = clamp_mss(&mut p, 1380);
                assert_eq!(changed, at.is_some(), "{name} v6={v6}");
                verify(&p).unwrap_or_else(|e| panic!("{name}: {e}"));
                match at {
                    Some(at) => {
                        assert_eq!(
                            &p[opts + at..opts + at + 2],
                            &1380u16.to_be_bytes(),
                            "{name}"
                        );
                        // Nothing else moved but the checksum.
                        let l4 = opts - 20;
                        for i in (0..p.len()).filter(|i| !(l4 + 16..l4 + 18).contains(i)) {
                            if !(opts + at..opts + at + 2).contains(&i) {
                                assert_eq!(p[i], original[i], "{name} byte {i}");
                            }
                        }
                    }
                    None => assert_eq!(p, original, "{name}"),
                }
            }
        }
    }
}

#[test]
fn mss_left_alone_without_syn_or_on_bad_packets() {
    let (p, _) = syn(false, tcp_flags::ACK, &[2, 4, 0x05, 0xb4]);
    let mut q = p.clone();
    assert!(!clamp_mss(&mut q, 1000));
    assert_eq!(q, p);
    let mut u = spec("10.0.0.1", "10.0.0.2", udp(&[2, 4, 5, 0xb4])).build();
    assert!(!clamp_mss(&mut u, 1000));
    // A later fragment of a SYN (no TCP header) and garbage.
    let (p, _) = syn(false, tcp_flags::SYN, &[2, 4, 0x05, 0xb4]);
    let mut big = p.clone();
    big.extend_from_slice(&[0; 64]);
    let total = big.len() as u16;
    big[2..4].copy_from_slice(&total.to_be_bytes());
    set_v4_checksum(&mut big);
    let mut later = fragment(&big, 20, &[24])[1].clone();
    assert!(!clamp_mss(&mut later, 1000));
    assert!(!clamp_mss(&mut [], 1000));
    assert!(!clamp_mss(&mut [0x45; 30], 1000));
}

#[test]
fn max_mss_for_the_tunnel() {
    assert_eq!(max_mss(1420, false), 1380);
    assert_eq!(max_mss(1420, true), 1360);
    assert_eq!(max_mss(30, true), 0);
}

// ------------------------------------------------------------- too big --

fn big_v4(df: bool, len: usize) -> Vec<u8> {
    let mut s = spec("10.0.2.7", "100.64.1.5", udp(&vec![0xab; len - 28]));
    s.df = df;
    s.build()
}

#[test]
fn too_big_v4_with_df() {
    let p = big_v4(true, 1500);
    let mut out = [0u8; 1500];
    let n = too_big_reply(&p, 1420, &mut out).unwrap();
    let r = &out[..n];
    assert_eq!(n, 20 + 8 + 20 + 8);
    verify(r).unwrap();
    let s = parse(r).unwrap();
    assert_eq!((s.src, s.dst), (ip("100.64.1.5"), ip("10.0.2.7")));
    assert_eq!(r[8], 64, "TTL");
    assert_eq!(
        (s.protocol, s.icmp_type, s.icmp_code),
        (1, Some(3), Some(4))
    );
    assert_eq!(&r[24..26], &[0, 0], "unused");
    assert_eq!(&r[26..28], &1420u16.to_be_bytes(), "next-hop MTU");
    assert_eq!(&r[28..], &p[..28], "quotes IP header + 8 bytes");
    // The reply itself is never answered.
    assert_eq!(too_big_reply(r, 10, &mut [0u8; 1500]), None);
}

#[test]
fn too_big_v4_cases_without_reply() {
    let mut out = [0u8; 1500];
    assert_eq!(
        too_big_reply(&big_v4(false, 1500), 1420, &mut out),
        None,
        "DF not set"
    );
    assert_eq!(
        too_big_reply(&big_v4(true, 1420), 1420, &mut out),
        None,
        "fits"
    );
    assert_eq!(
        too_big_reply(&big_v4(true, 1500), 1420, &mut out[..55]),
        None,
        "out too small"
    );
    assert!(too_big_reply(&big_v4(true, 1500), 1420, &mut out[..56]).is_some());
    for (src, dst) in [
        ("0.0.0.0", "10.0.0.1"),
        ("255.255.255.255", "10.0.0.1"),
        ("224.0.0.5", "10.0.0.1"),
        ("10.0.0.1", "239.1.1.1"),
        ("10.0.0.1", "255.255.255.255"),
    ] {
        let mut s = spec(src, dst, udp(&[0; 1472]));
        s.df = true;
        assert_eq!(
            too_big_reply(&s.build(), 1420, &mut out),
            None,
            "{src} -> {dst}"
        );
    }
    // ICMP errors get no error; an echo request does.
    for (t, reply) in [(3u8, false), (11, false), (12, false), (8, true), (0, true)] {
        let mut s = spec("10.0.0.1", "10.0.0.2", icmp(t, 0, [0; 4], vec![0x45; 1472]));
        s.df = true;
        assert_eq!(
            too_big_reply(&s.build(), 1420, &mut out).is_some(),
            reply,
            "type {t}"
        );
    }
    // A later fragment.
    let whole = big_v4(false, 1500);
    let mut later = fragment(&whole, 20, &[8])[1].clone();
    later[6] |= 0x40;
    set_v4_checksum(&mut later);
    assert_eq!(too_big_reply(&later, 1000, &mut out), None);
}

#[test]
fn too_big_v6() {
    let s = spec("fd00:10::7", "fd00:20::5", udp(&[0x5a; 1952]));
    let p = s.build();
    assert_eq!(p.len(), 2000);
    let mut out = [0u8; 1500];
    let n = too_big_reply(&p, 1420, &mut out).unwrap();
    assert_eq!(n, 1280, "as much as fits in the IPv6 minimum MTU");
    let r = &out[..n];
    verify(r).unwrap();
    let rs = parse(r).unwrap();
    assert_eq!((rs.src, rs.dst), (ip("fd00:20::5"), ip("fd00:10::7")));
    assert_eq!(r[7], 64, "hop limit");
    assert_eq!(
        (rs.protocol, rs.icmp_type, rs.icmp_code),
        (58, Some(2), Some(0))
    );
    assert_eq!(&r[44..48], &1420u32.to_be_bytes());
    assert_eq!(&r[48..], &p[..1232]);

    // A smaller packet is quoted whole.
    let p = spec("fd00:10::7", "fd00:20::5", udp(&[1; 1100])).build();
    let n = too_big_reply(&p, 1000, &mut out).unwrap();
    assert_eq!(n, 48 + p.len());
    verify(&out[..n]).unwrap();
    // A small output buffer limits the quote.
    let mut small = [0u8; 200];
    let n = too_big_reply(&p, 1000, &mut small).unwrap();
    assert_eq!(n, 200);
    verify(&small).unwrap();
    assert_eq!(too_big_reply(&p, 1000, &mut [0u8; 87]), None);
    assert_eq!(too_big_reply(&p, 1200, &mut out), None, "fits");
}

#[test]
fn too_big_v6_cases_without_reply() {
    let mut out = [0u8; 1500];
    for t in [1u8, 2, 3, 4, 127] {
        let p = spec("fd00::1", "fd00::2", icmp(t, 0, [0; 4], vec![0; 1400])).build();
        assert_eq!(too_big_reply(&p, 1280, &mut out), None, "type {t}");
    }
    let p = spec("fd00::1", "fd00::2", icmp(128, 0, [0; 4], vec![0; 1400])).build();
    assert!(too_big_reply(&p, 1280, &mut out).is_some(), "echo request");
    for (src, dst) in [
        ("::", "fd00::2"),
        ("ff02::1", "fd00::2"),
        ("fd00::1", "ff05::2"),
    ] {
        let p = spec(src, dst, udp(&[0; 1400])).build();
        assert_eq!(too_big_reply(&p, 1280, &mut out), None, "{src} -> {dst}");
    }
    let whole = spec("fd00::1", "fd00::2", udp(&[0; 1400])).build();
    let later = fragment(&whole, 40, &[8])[1].clone();
    assert_eq!(too_big_reply(&later, 100, &mut out), None, "later fragment");
    let first = fragment(&whole, 40, &[1304])[0].clone();
    assert!(
        too_big_reply(&first, 1280, &mut out).is_some(),
        "first fragment"
    );
}

// -------------------------------------------------------------- policy --

#[test]
fn policy_verdicts() {
    let rules = vec![
        AllowRule {
            cidr: net("10.0.5.0/24"),
            proto: Proto::Tcp,
            ports: Some(443..=443),
        },
        AllowRule {
            cidr: net("10.0.6.0/24"),
            proto: Proto::Udp,
            ports: Some(8000..=8080),
        },
        AllowRule {
            cidr: net("10.0.7.0/24"),
            proto: Proto::Icmp,
            ports: None,
        },
        AllowRule {
            cidr: net("fd00:5::/64"),
            proto: Proto::Any,
            ports: Some(22..=22),
        },
        AllowRule::any(net("10.0.8.0/24")),
    ];
    let peer4 = "100.64.1.5";
    let peer6 = "fd99::5";
    let tcp_to = |dst: &str, port: u16, flags: u8| {
        let src = if dst.contains(':') { peer6 } else { peer4 };
        let mut s = spec(src, dst, tcp(flags, &[], b""));
        if let L4::Tcp { dst_port, .. } = &mut s.l4 {
            *dst_port = port;
        }
        s.build()
    };
    let udp_to = |dst: &str, port: u16| {
        let src = if dst.contains(':') { peer6 } else { peer4 };
        let mut s = spec(src, dst, udp(b"x"));
        if let L4::Udp { dst_port, .. } = &mut s.l4 {
            *dst_port = port;
        }
        s.build()
    };
    let icmp_to = |dst: &str, t: u8| {
        let src = if dst.contains(':') { peer6 } else { peer4 };
        spec(src, dst, icmp(t, 0, [0; 4], vec![0; 8])).build()
    };
    let big_udp = spec(peer4, "10.0.9.9", udp(&[0; 100])).build();
    let later = fragment(&big_udp, 20, &[64])[1].clone();
    let first = fragment(&big_udp, 20, &[64])[0].clone();
    const SYN: u8 = tcp_flags::SYN;
    const ACK: u8 = tcp_flags::ACK;
    const RST: u8 = tcp_flags::RST;
    use AllowReason as A;
    use DenyReason as D;
    let table: Vec<(&str, Vec<u8>, Verdict)> = vec![
        (
            "allowed TCP port, SYN",
            tcp_to("10.0.5.1", 443, SYN),
            Verdict::Allow(A::Rule(0)),
        ),
        (
            "denied TCP port, SYN",
            tcp_to("10.0.5.1", 444, SYN),
            Verdict::Deny(D::PortNotAllowed),
        ),
        (
            "UDP to a TCP-only prefix",
            udp_to("10.0.5.1", 443),
            Verdict::Deny(D::ProtocolNotAllowed),
        ),
        (
            "SYN to an unlisted prefix",
            tcp_to("10.0.9.9", 443, SYN),
            Verdict::Deny(D::NoRuleMatched),
        ),
        (
            "ACK to an unlisted prefix",
            tcp_to("10.0.9.9", 50000, ACK),
            Verdict::Allow(A::TcpNotOpening),
        ),
        (
            "SYN-ACK (reply to our SYN)",
            tcp_to("10.0.9.9", 50000, SYN | ACK),
            Verdict::Allow(A::TcpNotOpening),
        ),
        (
            "RST",
            tcp_to("10.0.9.9", 50000, RST),
            Verdict::Allow(A::TcpNotOpening),
        ),
        (
            "ACK to a denied port",
            tcp_to("10.0.5.1", 444, ACK),
            Verdict::Allow(A::TcpNotOpening),
        ),
        (
            "UDP in range",
            udp_to("10.0.6.1", 8080),
            Verdict::Allow(A::Rule(1)),
        ),
        (
            "UDP out of range",
            udp_to("10.0.6.1", 8081),
            Verdict::Deny(D::PortNotAllowed),
        ),
        (
            "UDP reply without a rule",
            udp_to("10.0.9.9", 40000),
            Verdict::Deny(D::NoRuleMatched),
        ),
        (
            "ICMP echo request, ICMP rule",
            icmp_to("10.0.7.1", 8),
            Verdict::Allow(A::Rule(2)),
        ),
        (
            "ICMP echo request, no rule",
            icmp_to("10.0.9.9", 8),
            Verdict::Deny(D::NoRuleMatched),
        ),
        (
            "ICMP echo request, TCP rule",
            icmp_to("10.0.5.1", 8),
            Verdict::Deny(D::ProtocolNotAllowed),
        ),
        (
            "ICMP echo reply",
            icmp_to("10.0.9.9", 0),
            Verdict::Allow(A::IcmpEchoReply),
        ),
        (
            "ICMP unreachable",
            icmp_to("10.0.9.9", 3),
            Verdict::Allow(A::IcmpError),
        ),
        (
            "ICMP time exceeded",
            icmp_to("10.0.9.9", 11),
            Verdict::Allow(A::IcmpError),
        ),
        (
            "ICMP parameter problem",
            icmp_to("10.0.9.9", 12),
            Verdict::Allow(A::IcmpError),
        ),
        (
            "ICMP redirect",
            icmp_to("10.0.9.9", 5),
            Verdict::Deny(D::NoRuleMatched),
        ),
        (
            "ICMP source quench",
            icmp_to("10.0.9.9", 4),
            Verdict::Deny(D::NoRuleMatched),
        ),
        (
            "ICMP timestamp",
            icmp_to("10.0.9.9", 13),
            Verdict::Deny(D::NoRuleMatched),
        ),
        (
            "ICMPv6 echo reply",
            icmp_to("fd00:9::1", 129),
            Verdict::Allow(A::IcmpEchoReply),
        ),
        (
            "ICMPv6 packet too big",
            icmp_to("fd00:9::1", 2),
            Verdict::Allow(A::IcmpError),
        ),
        (
            "ICMPv6 echo request",
            icmp_to("fd00:9::1", 128),
            Verdict::Deny(D::NoRuleMatched),
        ),
        (
            "ICMPv6 neighbour advert",
            icmp_to("fd00:9::1", 136),
            Verdict::Deny(D::NoRuleMatched),
        ),
        (
            "v6 any+port: TCP 22",
            tcp_to("fd00:5::1", 22, SYN),
            Verdict::Allow(A::Rule(3)),
        ),
        (
            "v6 any+port: UDP 22",
            udp_to("fd00:5::1", 22),
            Verdict::Allow(A::Rule(3)),
        ),
        (
            "v6 any+port: ICMPv6",
            icmp_to("fd00:5::1", 128),
            Verdict::Deny(D::PortNotAllowed),
        ),
        (
            "v6 any+port: TCP 23",
            tcp_to("fd00:5::1", 23, SYN),
            Verdict::Deny(D::PortNotAllowed),
        ),
        (
            "any rule: UDP",
            udp_to("10.0.8.1", 9),
            Verdict::Allow(A::Rule(4)),
        ),
        (
            "any rule: SYN",
            tcp_to("10.0.8.1", 9, SYN),
            Verdict::Allow(A::Rule(4)),
        ),
        (
            "UDP first fragment, no rule",
            first,
            Verdict::Deny(D::NoRuleMatched),
        ),
        ("later fragment", later, Verdict::Allow(A::LaterFragment)),
    ];
    for (name, packet, verdict) in table {
        let s = parse(&packet).unwrap();
        assert_eq!(allowed(&rules, &s), verdict, "{name}");
        assert_eq!(
            allowed(&rules, &s).is_allowed(),
            matches!(verdict, Verdict::Allow(_))
        );
    }
}

#[test]
fn labels_are_unique() {
    let mut labels: Vec<&str> = PacketError::ALL.iter().map(|e| e.label()).collect();
    labels.extend(DenyReason::ALL.iter().map(|d| d.label()));
    let n = labels.len();
    labels.sort_unstable();
    labels.dedup();
    assert_eq!(labels.len(), n);
}
