//! ICMP "fragmentation needed" / ICMPv6 "packet too big" generation.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::checksum::{finish, sum, write_u16};
use super::parse::{Fragment, IpVersion, Summary, icmp_protocol, parse, proto};

/// The IPv6 minimum MTU: an ICMPv6 error must fit in it (RFC 4443 §2.4).
const IPV6_MIN_MTU: usize = 1280;
/// Hop limit / TTL of generated messages.
const HOP_LIMIT: u8 = 64;

/// Writes into `out` the ICMP message that tells the sender of `packet` it
/// is too big for a path of `mtu` bytes, and returns its length; `None`
/// when no message is due or `out` is too small.
///
/// - IPv4: only for a packet longer than `mtu` with DF set. The reply is a
///   type 3 code 4 "fragmentation needed" with next-hop MTU `mtu`
///   (RFC 1191), quoting the IP header and the first 8 bytes of payload
///   (RFC 792); `out` must hold all of it (28 + header + 8 bytes).
/// - IPv6: for any packet longer than `mtu`. The reply is a type 2 "packet
///   too big" with MTU `mtu`, quoting as much of the packet as fits in
///   1280 bytes (RFC 4443), or in `out` if it is smaller (at least the
///   40-byte IPv6 header must fit).
///
/// The reply goes from the packet's destination to its source with TTL/hop
/// limit 64 and correct checksums (ICMPv6 with the pseudo-header). Never
/// for an ICMP error (IPv4 types 3, 4, 5, 11, 12; any ICMPv6 error, types
/// below 128), a later fragment, a malformed packet, a multicast, broadcast
/// or unspecified source, or a multicast or broadcast destination (the reply
/// must come from a unicast address).
pub fn too_big_reply(packet: &[u8], mtu: u16, out: &mut [u8]) -> Option<usize> {
    let summary = parse(packet).ok()?;
    if summary.len <= usize::from(mtu) || summary.fragment == Fragment::Later {
        return None;
    }
    match (summary.src, summary.dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            if !may_reply_v4(src, dst) || packet.get(6)? & 0x40 == 0 || is_error(&summary) {
                return None;
            }
            reply_v4(packet, &summary, src, dst, mtu, out)
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            if !may_reply_v6(src, dst) || is_error(&summary) {
                return None;
            }
            reply_v6(packet, &summary, src, dst, mtu, out)
        }
        _ => None,
    }
}

/// Whether `summary` is an ICMP error: for IPv4 the types that quote a
/// packet, for IPv6 every type below 128 (RFC 4443 §2.1).
fn is_error(summary: &Summary) -> bool {
    if summary.protocol != icmp_protocol(summary.version) {
        return false;
    }
    match (summary.version, summary.icmp_type) {
        (IpVersion::V4, Some(_)) => summary.is_icmp_error(),
        (IpVersion::V6, Some(t)) => t < 128,
        // An ICMP packet whose header we cannot see: do not risk it.
        (_, None) => true,
    }
}

fn may_reply_v4(src: Ipv4Addr, dst: Ipv4Addr) -> bool {
    !(src.is_unspecified()
        || src.is_broadcast()
        || src.is_multicast()
        || dst.is_broadcast()
        || dst.is_multicast()
        || dst.is_unspecified())
}

fn may_reply_v6(src: Ipv6Addr, dst: Ipv6Addr) -> bool {
    !(src.is_unspecified() || src.is_multicast() || dst.is_multicast() || dst.is_unspecified())
}

fn reply_v4(
    packet: &[u8],
    summary: &Summary,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    mtu: u16,
    out: &mut [u8],
) -> Option<usize> {
    let header_len = usize::from(packet.first()? & 0x0f) * 4;
    let quote_len = (header_len + 8).min(summary.len);
    let icmp_len = 8 + quote_len;
    let total = 20 + icmp_len;
    let reply = out.get_mut(..total)?;
    let quote = packet.get(..quote_len)?;
    // IPv4 header: no options, no fragmentation, from the packet's
    // destination back to its source.
    reply[..20].copy_from_slice(&[
        0x45,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        HOP_LIMIT,
        proto::ICMP,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ]);
    write_u16(reply, 2, u16::try_from(total).ok()?);
    reply[12..16].copy_from_slice(&dst.octets());
    reply[16..20].copy_from_slice(&src.octets());
    let header_checksum = finish(sum(0, &reply[..20]));
    write_u16(reply, 10, header_checksum);
    // ICMP: type 3 code 4, unused, next-hop MTU (RFC 1191), quote.
    let icmp = &mut reply[20..];
    icmp[..8].copy_from_slice(&[3, 4, 0, 0, 0, 0, 0, 0]);
    write_u16(icmp, 6, mtu);
    icmp[8..].copy_from_slice(quote);
    let icmp_checksum = finish(sum(0, icmp));
    write_u16(icmp, 2, icmp_checksum);
    Some(total)
}

fn reply_v6(
    packet: &[u8],
    summary: &Summary,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    mtu: u16,
    out: &mut [u8],
) -> Option<usize> {
    let cap = out.len().min(IPV6_MIN_MTU);
    // At least the invoking packet's IPv6 header must be quoted.
    if cap < 48 + 40 {
        return None;
    }
    let quote_len = summary.len.min(cap - 48);
    let icmp_len = 8 + quote_len;
    let total = 40 + icmp_len;
    let reply = out.get_mut(..total)?;
    let quote = packet.get(..quote_len)?;
    reply[..8].copy_from_slice(&[0x60, 0, 0, 0, 0, 0, proto::ICMPV6, HOP_LIMIT]);
    write_u16(reply, 4, u16::try_from(icmp_len).ok()?);
    reply[8..24].copy_from_slice(&dst.octets());
    reply[24..40].copy_from_slice(&src.octets());
    let (header, icmp) = reply.split_at_mut(40);
    icmp[..8].copy_from_slice(&[2, 0, 0, 0, 0, 0, 0, 0]);
    icmp[4..8].copy_from_slice(&u32::from(mtu).to_be_bytes());
    icmp[8..].copy_from_slice(quote);
    // Pseudo-header: source, destination, upper-layer length, next header.
    let mut s = sum(0, &header[8..40]);
    s = sum(s, &u32::try_from(icmp_len).ok()?.to_be_bytes());
    s = sum(s, &[0, 0, 0, proto::ICMPV6]);
    s = sum(s, icmp);
    write_u16(icmp, 2, finish(s));
    Some(total)
}
