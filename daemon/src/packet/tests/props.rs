//! Property tests: translate-then-reverse is the identity, every translated
//! packet equals the same packet built in full with the translated
//! addresses, and its checksums verify with etherparse.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use proptest::prelude::*;
use proptest::sample::Index;

use super::build::{Ext, L4, Spec, fragment, reassemble, verify};
use crate::packet::{
    AllowRule, Proto, allowed, clamp_mss, parse, too_big_reply, translate_dst, translate_src,
};

/// Two distinct prefixes of the same family and length (so they do not
/// overlap).
fn arb_prefixes(v6: bool) -> BoxedStrategy<(IpNet, IpNet)> {
    if v6 {
        (1u8..=128, any::<u128>(), any::<u128>())
            .prop_map(|(len, a, b)| {
                let from = Ipv6Net::new(Ipv6Addr::from(a), len).unwrap().trunc();
                let to = Ipv6Net::new(Ipv6Addr::from(b), len).unwrap().trunc();
                (IpNet::V6(from), IpNet::V6(to))
            })
            .prop_filter("distinct prefixes", |(a, b)| a != b)
            .boxed()
    } else {
        (1u8..=32, any::<u32>(), any::<u32>())
            .prop_map(|(len, a, b)| {
                let from = Ipv4Net::new(Ipv4Addr::from(a), len).unwrap().trunc();
                let to = Ipv4Net::new(Ipv4Addr::from(b), len).unwrap().trunc();
                (IpNet::V4(from), IpNet::V4(to))
            })
            .prop_filter("distinct prefixes", |(a, b)| a != b)
            .boxed()
    }
}

/// An address inside `net` with the given host bits.
fn inside(net: &IpNet, bits: u128) -> IpAddr {
    match net {
        IpNet::V4(n) => {
            let mask = u32::from(n.netmask());
            IpAddr::V4(Ipv4Addr::from(
                (u32::from(n.network()) & mask) | (bits as u32 & !mask),
            ))
        }
        IpNet::V6(n) => {
            let mask = u128::from(n.netmask());
            IpAddr::V6(Ipv6Addr::from(
                (u128::from(n.network()) & mask) | (bits & !mask),
            ))
        }
    }
}

/// `addr` moved from `from` to `to` (the model of the translation).
fn moved(addr: IpAddr, from: &IpNet, to: &IpNet) -> IpAddr {
    assert!(from.contains(&addr));
    let host = match addr {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    };
    inside(to, host)
}

fn arb_addr(v6: bool) -> BoxedStrategy<IpAddr> {
    if v6 {
        any::<u128>()
            .prop_map(|a| IpAddr::V6(Ipv6Addr::from(a)))
            .boxed()
    } else {
        any::<u32>()
            .prop_map(|a| IpAddr::V4(Ipv4Addr::from(a)))
            .boxed()
    }
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..=max)
}

/// IPv6 extension headers: maybe a hop-by-hop first, then routing and
/// destination options in any order.
fn arb_ext() -> impl Strategy<Value = Vec<Ext>> {
    let body = (0usize..3).prop_flat_map(|k| proptest::collection::vec(any::<u8>(), 6 + 8 * k));
    (
        proptest::option::of(body.clone()),
        proptest::collection::vec((any::<bool>(), body), 0..3),
    )
        .prop_map(|(hbh, rest)| {
            let mut ext = Vec::new();
            if let Some(b) = hbh {
                ext.push(Ext::HopByHop(b));
            }
            for (routing, b) in rest {
                ext.push(if routing {
                    Ext::Routing(b)
                } else {
                    Ext::DestOpts(b)
                });
            }
            ext
        })
}

/// TCP, UDP or ICMP echo content.
fn arb_simple_l4(v6: bool) -> BoxedStrategy<L4> {
    let tcp = (
        any::<u16>(),
        any::<u16>(),
        any::<u32>(),
        any::<u8>(),
        (0usize..=10).prop_flat_map(|w| proptest::collection::vec(any::<u8>(), w * 4)),
        bytes(64),
    )
        .prop_map(
            |(src_port, dst_port, seq, flags, options, payload)| L4::Tcp {
                src_port,
                dst_port,
                seq,
                flags,
                options,
                payload,
            },
        );
    let udp = (any::<u16>(), any::<u16>(), bytes(64), any::<bool>()).prop_map(
        move |(src_port, dst_port, payload, zero)| L4::Udp {
            src_port,
            dst_port,
            payload,
            // A zero UDP checksum is only legal in IPv4.
            no_checksum: zero && !v6,
        },
    );
    let echo_types: &'static [u8] = if v6 { &[128, 129] } else { &[8, 0] };
    let echo = (
        proptest::sample::select(echo_types),
        any::<[u8; 4]>(),
        bytes(64),
    )
        .prop_map(|(icmp_type, rest, payload)| L4::Icmp {
            icmp_type,
            code: 0,
            rest,
            payload,
        });
    prop_oneof![tcp, udp, echo].boxed()
}

fn arb_spec(v6: bool) -> impl Strategy<Value = Spec> {
    (
        arb_addr(v6),
        arb_addr(v6),
        any::<u8>(),
        any::<u16>(),
        (0usize..=10).prop_flat_map(|w| proptest::collection::vec(any::<u8>(), w * 4)),
        arb_ext(),
        arb_simple_l4(v6),
    )
        .prop_map(move |(src, dst, ttl, id, v4_options, ext, l4)| Spec {
            src,
            dst,
            ttl,
            id,
            df: false,
            v4_options: if v6 { Vec::new() } else { v4_options },
            ext: if v6 { ext } else { Vec::new() },
            l4,
        })
}

#[derive(Clone, Copy, Debug)]
enum Dir {
    Dst,
    Src,
}

fn run(dir: Dir, packet: &mut [u8], from: &IpNet, to: &IpNet) -> bool {
    match dir {
        Dir::Dst => translate_dst(packet, from, to),
        Dir::Src => translate_src(packet, from, to),
    }
    .unwrap()
}

/// Points the translated side of `spec` into `from` and returns the spec
/// with that address moved to `to`.
fn place(spec: &mut Spec, dir: Dir, from: &IpNet, to: &IpNet, host: u128) -> Spec {
    let mut moved_spec = spec.clone();
    match dir {
        Dir::Dst => {
            spec.dst = inside(from, host);
            moved_spec.dst = moved(spec.dst, from, to);
            moved_spec.src = spec.src;
        }
        Dir::Src => {
            spec.src = inside(from, host);
            moved_spec.src = moved(spec.src, from, to);
            moved_spec.dst = spec.dst;
        }
    }
    moved_spec
}

/// Checks translate, compare, verify, reverse on one packet.
fn check_one(dir: Dir, original: &[u8], expected: &[u8], from: &IpNet, to: &IpNet) -> Vec<u8> {
    let mut p = original.to_vec();
    assert!(run(dir, &mut p, from, to), "address not translated");
    assert_eq!(
        p, expected,
        "translated packet differs from the full rebuild"
    );
    let mut back = p.clone();
    assert!(run(dir, &mut back, to, from), "reverse did not translate");
    assert_eq!(back, original, "translate then reverse is not the identity");
    // Not inside `to` the other way round: untouched.
    let mut same = original.to_vec();
    assert!(!run(dir, &mut same, to, from));
    assert_eq!(same, original);
    p
}

fn translate_case(
    dir: Dir,
    mut spec: Spec,
    (from, to): (IpNet, IpNet),
    host: u128,
    splits: Vec<u16>,
) {
    let moved_spec = place(&mut spec, dir, &from, &to, host);
    let original = spec.build();
    let expected = moved_spec.build();
    let (unfrag, must) = spec.fragmentable();
    let payload_len = original.len() - unfrag;
    let min_split = must.div_ceil(8) * 8;
    let mut offsets: Vec<usize> = splits
        .iter()
        .map(|s| (usize::from(*s) % payload_len.max(1)) / 8 * 8)
        .filter(|s| *s >= min_split.max(8) && *s < payload_len)
        .collect();
    offsets.sort_unstable();
    offsets.dedup();
    if offsets.is_empty() {
        let p = check_one(dir, &original, &expected, &from, &to);
        verify(&p).unwrap();
    } else {
        let frags = fragment(&original, unfrag, &offsets);
        let frags_expected = fragment(&expected, unfrag, &offsets);
        let mut translated = Vec::new();
        for (f, e) in frags.iter().zip(&frags_expected) {
            translated.push(check_one(dir, f, e, &from, &to));
        }
        let whole = reassemble(&translated, unfrag);
        assert_eq!(whole, expected);
        verify(&whole).unwrap();
    }
}

/// The quote the translation should leave in an ICMP error: the translated
/// inner packet when its fixed header is all there (with a checksum field
/// cut in half left alone), else the original bytes.
fn expected_quote(inner: &Spec, orig: &[u8], trans: &[u8], q: usize) -> Vec<u8> {
    let fixed = if inner.is_v6() { 40 } else { 20 };
    if q < fixed {
        return orig[..q].to_vec();
    }
    let mut e = trans[..q].to_vec();
    if let Some(c) = inner.l4_checksum_offset() {
        let c = inner.l4_offset() + c;
        if c < q && q < c + 2 {
            e[c] = orig[c];
        }
    }
    e
}

fn icmp_error_case(
    dir: Dir,
    mut outer: Spec,
    mut inner: Spec,
    (from, to): (IpNet, IpNet),
    host: u128,
    (icmp_type, code, rest): (u8, u8, [u8; 4]),
    (quote_kind, index): (u8, Index),
) {
    let moved_outer = place(&mut outer, dir, &from, &to, host);
    // The quote is a packet the error's recipient sent (dst translation) or
    // one sent towards the translated source (src translation).
    let mut moved_inner = inner.clone();
    match dir {
        Dir::Dst => {
            inner.src = outer.dst;
            moved_inner.src = moved_outer.dst;
            moved_inner.dst = inner.dst;
        }
        Dir::Src => {
            inner.dst = outer.src;
            moved_inner.dst = moved_outer.src;
            moved_inner.src = inner.src;
        }
    }
    let inner_orig = inner.build();
    let inner_trans = moved_inner.build();
    let q = match quote_kind % 3 {
        0 => inner_orig.len(),
        1 => (inner.l4_offset() + 8).min(inner_orig.len()),
        _ => index.index(inner_orig.len() + 1),
    };
    let quote = inner_orig[..q].to_vec();
    let quote_expected = expected_quote(&inner, &inner_orig, &inner_trans, q);
    let l4 = |payload| L4::Icmp {
        icmp_type,
        code,
        rest,
        payload,
    };
    outer.l4 = l4(quote);
    let mut moved_outer = moved_outer;
    moved_outer.l4 = l4(quote_expected);
    let original = outer.build();
    let expected = moved_outer.build();
    let p = check_one(dir, &original, &expected, &from, &to);
    verify(&p).unwrap();
}

fn error_type(v6: bool) -> BoxedStrategy<(u8, u8, [u8; 4])> {
    let types: &'static [u8] = if v6 {
        &[1, 2, 3, 4]
    } else {
        &[3, 4, 5, 11, 12]
    };
    (
        proptest::sample::select(types),
        any::<u8>(),
        any::<[u8; 4]>(),
    )
        .boxed()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn v4_translate_dst(spec in arb_spec(false), m in arb_prefixes(false), host: u128,
                        splits in proptest::collection::vec(any::<u16>(), 0..3)) {
        translate_case(Dir::Dst, spec, m, host, splits);
    }

    #[test]
    fn v4_translate_src(spec in arb_spec(false), m in arb_prefixes(false), host: u128,
                        splits in proptest::collection::vec(any::<u16>(), 0..3)) {
        translate_case(Dir::Src, spec, m, host, splits);
    }

    #[test]
    fn v6_translate_dst(spec in arb_spec(true), m in arb_prefixes(true), host: u128,
                        splits in proptest::collection::vec(any::<u16>(), 0..3)) {
        translate_case(Dir::Dst, spec, m, host, splits);
    }

    #[test]
    fn v6_translate_src(spec in arb_spec(true), m in arb_prefixes(true), host: u128,
                        splits in proptest::collection::vec(any::<u16>(), 0..3)) {
        translate_case(Dir::Src, spec, m, host, splits);
    }

    #[test]
    fn v4_icmp_error_dst(outer in arb_spec(false), inner in arb_spec(false), m in arb_prefixes(false),
                         host: u128, t in error_type(false), q in (any::<u8>(), any::<Index>())) {
        icmp_error_case(Dir::Dst, outer, inner, m, host, t, q);
    }

    #[test]
    fn v4_icmp_error_src(outer in arb_spec(false), inner in arb_spec(false), m in arb_prefixes(false),
                         host: u128, t in error_type(false), q in (any::<u8>(), any::<Index>())) {
        icmp_error_case(Dir::Src, outer, inner, m, host, t, q);
    }

    #[test]
    fn v6_icmp_error_dst(outer in arb_spec(true), inner in arb_spec(true), m in arb_prefixes(true),
                         host: u128, t in error_type(true), q in (any::<u8>(), any::<Index>())) {
        icmp_error_case(Dir::Dst, outer, inner, m, host, t, q);
    }

    #[test]
    fn v6_icmp_error_src(outer in arb_spec(true), inner in arb_spec(true), m in arb_prefixes(true),
                         host: u128, t in error_type(true), q in (any::<u8>(), any::<Index>())) {
        icmp_error_case(Dir::Src, outer, inner, m, host, t, q);
    }

    /// Any bytes at all: no function panics.
    #[test]
    fn arbitrary_bytes_never_panic(data in bytes(200), m4 in arb_prefixes(false),
                                   m6 in arb_prefixes(true), mtu in 0u16..=1500, mss: u16) {
        exercise(&data, &m4, &m6, mtu, mss);
    }

    /// Valid packets with a few bytes changed and cut anywhere: no function
    /// panics (this reaches deeper than random bytes).
    #[test]
    fn mutated_packets_never_panic(spec4 in arb_spec(false), inner4 in arb_spec(false),
                                   spec6 in arb_spec(true), inner6 in arb_spec(true),
                                   v6: bool, m4 in arb_prefixes(false), m6 in arb_prefixes(true),
                                   edits in proptest::collection::vec((any::<Index>(), any::<u8>()), 0..4),
                                   cut: Index, error: bool, mtu in 0u16..=1500, mss: u16) {
        let (spec, inner, error_type) = if v6 { (spec6, inner6, 1) } else { (spec4, inner4, 3) };
        let mut packet = if error {
            let mut outer = spec.clone();
            outer.src = inner.dst;
            outer.dst = inner.src;
            outer.v4_options.clear();
            outer.ext.clear();
            outer.l4 = L4::Icmp { icmp_type: error_type, code: 4, rest: [0; 4], payload: inner.build() };
            outer.build()
        } else {
            spec.build()
        };
        for (at, b) in &edits {
            let i = at.index(packet.len());
            packet[i] = *b;
        }
        let len = cut.index(packet.len() + 1);
        exercise(&packet[..len], &m4, &m6, mtu, mss);
        exercise(&packet, &m4, &m6, mtu, mss);
    }

    /// Clamping keeps the TCP checksum valid and yields min(mss, max).
    #[test]
    fn clamp_keeps_checksum_valid(v6: bool, spec4 in arb_spec(false), spec6 in arb_spec(true),
                                  layout in arb_options(), max: u16, syn_ack: bool) {
        let mut spec = if v6 { spec6 } else { spec4 };
        let (options, mss_at) = layout;
        spec.l4 = L4::Tcp {
            src_port: 1, dst_port: 2, seq: 3,
            flags: if syn_ack { 0x12 } else { 0x02 },
            options: options.clone(), payload: vec![],
        };
        let original = spec.build();
        let mut p = original.clone();
        let changed = clamp_mss(&mut p, max);
        verify(&p).unwrap();
        let l4 = spec.l4_offset();
        if let Some(at) = mss_at {
            let before = u16::from_be_bytes([options[at + 2], options[at + 3]]);
            let after = u16::from_be_bytes([p[l4 + 20 + at + 2], p[l4 + 20 + at + 3]]);
            prop_assert_eq!(after, before.min(max));
            prop_assert_eq!(changed, before > max);
        } else {
            prop_assert!(!changed);
            prop_assert_eq!(p, original);
        }
    }

    /// Replies are well formed for any packet larger than the MTU.
    #[test]
    fn too_big_replies_verify(spec in arb_spec(false), v6: bool, spec6 in arb_spec(true),
                              extra in 0usize..1600, mtu in 0u16..=1400) {
        let mut spec = if v6 { spec6 } else { spec };
        spec.df = true;
        if let L4::Udp { payload, .. } = &mut spec.l4 {
            payload.resize(extra, 0x5a);
        }
        let packet = spec.build();
        let mut out = [0u8; 1500];
        let reply = too_big_reply(&packet, mtu, &mut out);
        let unicast = |a: IpAddr| match a {
            IpAddr::V4(a) => !(a.is_unspecified() || a.is_broadcast() || a.is_multicast()),
            IpAddr::V6(a) => !(a.is_unspecified() || a.is_multicast()),
        };
        let due = packet.len() > usize::from(mtu) && unicast(spec.src) && unicast(spec.dst);
        if due {
            let n = reply.expect("a reply is due");
            verify(&out[..n]).unwrap();
            prop_assert!(n <= 1280);
            let s = parse(&out[..n]).unwrap();
            prop_assert_eq!(s.dst, spec.src);
            prop_assert_eq!(s.src, spec.dst);
        } else if packet.len() <= usize::from(mtu) {
            prop_assert_eq!(reply, None);
        }
    }
}

/// TCP options with at most one well-formed MSS option somewhere among
/// NOPs, SACK-permitted, timestamps and window scale; returns the options
/// (padded to a multiple of 4 with EOL) and the offset of the MSS option.
fn arb_options() -> impl Strategy<Value = (Vec<u8>, Option<usize>)> {
    let item = prop_oneof![
        Just(vec![1u8]),
        Just(vec![4u8, 2]),
        any::<[u8; 8]>().prop_map(|t| {
            let mut v = vec![8u8, 10];
            v.extend_from_slice(&t);
            v
        }),
        any::<u8>().prop_map(|s| vec![3u8, 3, s]),
    ];
    (
        proptest::collection::vec(item.clone(), 0..4),
        proptest::option::of(any::<u16>()),
        proptest::collection::vec(item, 0..3),
    )
        .prop_filter_map("options fit in 40 bytes", |(before, mss, after)| {
            let mut o: Vec<u8> = before.concat();
            let at = mss.map(|m| {
                let at = o.len();
                o.extend_from_slice(&[2, 4]);
                o.extend_from_slice(&m.to_be_bytes());
                at
            });
            o.extend(after.concat());
            while o.len() & 3 != 0 {
                o.push(0);
            }
            (o.len() <= 40).then_some((o, at))
        })
}

/// Calls every public function on `data`; they must not panic.
fn exercise(data: &[u8], m4: &(IpNet, IpNet), m6: &(IpNet, IpNet), mtu: u16, mss: u16) {
    let summary = parse(data);
    for (from, to) in [m4, m6, &(m4.0, m6.0)] {
        let mut p = data.to_vec();
        let _ = translate_dst(&mut p, from, to);
        let _ = translate_src(&mut p, from, to);
        // Translating at the packet's own addresses reaches the deep paths.
        if let Ok(s) = summary {
            for (addr, len) in [(s.dst, 24u8), (s.src, 112)] {
                let own = IpNet::new(addr, if addr.is_ipv4() { len.min(32) } else { len }).unwrap();
                let other = if addr.is_ipv4() { m4.1 } else { m6.1 };
                let other = IpNet::new(other.network(), own.prefix_len()).unwrap();
                let mut q = data.to_vec();
                let _ = translate_dst(&mut q, &own, &other);
                let _ = translate_src(&mut q, &own, &other);
            }
        }
    }
    let mut p = data.to_vec();
    let _ = clamp_mss(&mut p, mss);
    let mut out = [0u8; 1500];
    let _ = too_big_reply(data, mtu, &mut out);
    let mut small = [0u8; 60];
    let _ = too_big_reply(data, mtu, &mut small);
    if let Ok(s) = summary {
        let rules = [
            AllowRule {
                cidr: m4.0,
                proto: Proto::Tcp,
                ports: Some(0..=1000),
            },
            AllowRule {
                cidr: m6.0,
                proto: Proto::Udp,
                ports: None,
            },
            AllowRule::any(IpNet::new(s.dst, 0).unwrap()),
        ];
        let _ = allowed(&rules, &s);
        let _ = allowed(&[], &s);
    }
}
