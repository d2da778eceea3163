//! Parsing and validation of one raw IPv4 or IPv6 packet.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::checksum::read_u16;

/// IP protocol numbers used by this module.
pub(crate) mod proto {
    /// ICMP (IPv4).
    pub(crate) const ICMP: u8 = 1;
    /// TCP.
    pub(crate) const TCP: u8 = 6;
    /// UDP.
    pub(crate) const UDP: u8 = 17;
    /// IPv6 hop-by-hop options.
    pub(crate) const HOP_BY_HOP: u8 = 0;
    /// IPv6 routing header.
    pub(crate) const ROUTING: u8 = 43;
    /// IPv6 fragment header.
    pub(crate) const FRAGMENT: u8 = 44;
    /// IPv6 destination options.
    pub(crate) const DEST_OPTS: u8 = 60;
    /// ICMPv6.
    pub(crate) const ICMPV6: u8 = 58;
}

/// TCP flag bits as found in [`Summary::tcp_flags`] (byte 13 of the TCP
/// header).
pub mod tcp_flags {
    /// FIN: no more data from sender.
    pub const FIN: u8 = 0x01;
    /// SYN: synchronise sequence numbers (opens a connection).
    pub const SYN: u8 = 0x02;
    /// RST: reset the connection.
    pub const RST: u8 = 0x04;
    /// PSH: push function.
    pub const PSH: u8 = 0x08;
    /// ACK: the acknowledgment field is significant.
    pub const ACK: u8 = 0x10;
}

/// The most IPv6 extension headers [`parse()`] walks before giving up with
/// [`PacketError::TooManyExtensionHeaders`].
pub const MAX_EXTENSION_HEADERS: usize = 8;

/// Why a packet was rejected. Each variant is one drop reason the daemon
/// counts; [`PacketError::label`] is its metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, thiserror::Error)]
pub enum PacketError {
    /// The buffer ends before the IP header does (20 bytes or the IHL for
    /// IPv4, 40 bytes for IPv6).
    #[error("packet truncated: shorter than its IP header")]
    Truncated,
    /// The version nibble is neither 4 nor 6.
    #[error("IP version is neither 4 nor 6")]
    BadVersion,
    /// The IPv4 header length (IHL) is below 5 words.
    #[error("IPv4 header length below 20 bytes")]
    BadHeaderLength,
    /// The IPv4 total length or IPv6 payload length claims more bytes than
    /// the buffer holds, or (IPv4) fewer than the header itself.
    #[error("IP total/payload length does not match the buffer")]
    BadTotalLength,
    /// An IPv6 extension header runs past the end of the packet.
    #[error("IPv6 extension header runs past the end of the packet")]
    BadExtensionHeader,
    /// More than [`MAX_EXTENSION_HEADERS`] IPv6 extension headers.
    #[error("too many IPv6 extension headers")]
    TooManyExtensionHeaders,
    /// An unfragmented packet or first fragment does not hold the whole TCP
    /// (20 bytes + options), UDP (8) or ICMP/ICMPv6 (8) header.
    #[error("transport header truncated")]
    TruncatedTransport,
    /// The TCP data offset is below 5 words.
    #[error("TCP data offset below 20 bytes")]
    BadTcpDataOffset,
    /// A later fragment of a TCP datagram that overlaps the first 20 bytes of
    /// the TCP header (the RFC 1858 tiny/overlapping fragment attack, which
    /// could rewrite the flags or ports the policy saw).
    #[error("fragment overlaps the TCP header")]
    TinyFragment,
    /// The two prefixes of a translation differ in address family or prefix
    /// length (a caller bug; [`super::View`] rules it out).
    #[error("translation prefixes differ in family or length")]
    MismatchedPrefixes,
}

impl PacketError {
    /// Every variant, for pre-registering metric labels.
    pub const ALL: [PacketError; 10] = [
        PacketError::Truncated,
        PacketError::BadVersion,
        PacketError::BadHeaderLength,
        PacketError::BadTotalLength,
        PacketError::BadExtensionHeader,
        PacketError::TooManyExtensionHeaders,
        PacketError::TruncatedTransport,
        PacketError::BadTcpDataOffset,
        PacketError::TinyFragment,
        PacketError::MismatchedPrefixes,
    ];

    /// A short snake_case name for metrics and logs.
    pub const fn label(self) -> &'static str {
        match self {
            PacketError::Truncated => "truncated",
            PacketError::BadVersion => "bad_version",
            PacketError::BadHeaderLength => "bad_header_length",
            PacketError::BadTotalLength => "bad_total_length",
            PacketError::BadExtensionHeader => "bad_extension_header",
            PacketError::TooManyExtensionHeaders => "too_many_extension_headers",
            PacketError::TruncatedTransport => "truncated_transport",
            PacketError::BadTcpDataOffset => "bad_tcp_data_offset",
            PacketError::TinyFragment => "tiny_fragment",
            PacketError::MismatchedPrefixes => "mismatched_prefixes",
        }
    }
}

/// IP version of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IpVersion {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

/// Where a packet stands with respect to fragmentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fragment {
    /// Not fragmented (this includes IPv6 "atomic fragments": a fragment
    /// header with offset 0 and no more fragments, RFC 6946).
    Whole,
    /// The first fragment (offset 0, more fragments follow): it carries the
    /// transport header.
    First,
    /// A later fragment (offset > 0): no transport header.
    Later,
}

/// What the data path needs to know about one packet, from [`parse()`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary {
    /// IP version.
    pub version: IpVersion,
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Transport protocol number: the IPv4 protocol field, or for IPv6 the
    /// first next-header value that is not hop-by-hop, routing, fragment or
    /// destination options (AH, 51, is not walked: it is reported as the
    /// protocol). For a later fragment it is the fragment header's
    /// next-header value.
    pub protocol: u8,
    /// Fragmentation state.
    pub fragment: Fragment,
    /// Length of the packet in bytes (IPv4 total length, or 40 + IPv6
    /// payload length). The buffer may be longer; bytes past `len` are not
    /// part of the packet and are never touched.
    pub len: usize,
    /// Offset of the transport header, when this packet carries it (not for
    /// later fragments).
    pub l4_offset: Option<usize>,
    /// TCP flags byte (see [`tcp_flags`]), for TCP packets that carry the
    /// header.
    pub tcp_flags: Option<u8>,
    /// Source port, for TCP and UDP packets that carry the header.
    pub src_port: Option<u16>,
    /// Destination port, for TCP and UDP packets that carry the header.
    pub dst_port: Option<u16>,
    /// ICMP type (ICMPv4 in IPv4, ICMPv6 in IPv6), when the header is
    /// present.
    pub icmp_type: Option<u8>,
    /// ICMP code, when the header is present.
    pub icmp_code: Option<u8>,
}

impl Summary {
    /// Whether this packet is part of a fragmented datagram.
    pub fn is_fragment(&self) -> bool {
        self.fragment != Fragment::Whole
    }

    /// Whether this packet carries the transport header (not a later
    /// fragment).
    pub fn carries_transport_header(&self) -> bool {
        self.l4_offset.is_some()
    }

    /// Whether this is a TCP segment with SYN set (SYN or SYN-ACK).
    pub fn is_tcp_syn(&self) -> bool {
        self.tcp_flags
            .is_some_and(|flags| flags & tcp_flags::SYN != 0)
    }

    /// Whether this is an ICMP (IPv4) or ICMPv6 error message that quotes the
    /// packet that caused it (ICMPv4 types 3, 4, 5, 11, 12; ICMPv6 types
    /// 1 to 4).
    pub fn is_icmp_error(&self) -> bool {
        self.icmp_type
            .is_some_and(|t| is_quoting_error(self.version, t))
    }
}

/// ICMP types whose body is the quoted packet that caused them.
pub(crate) fn is_quoting_error(version: IpVersion, icmp_type: u8) -> bool {
    match version {
        IpVersion::V4 => matches!(icmp_type, 3 | 4 | 5 | 11 | 12),
        IpVersion::V6 => matches!(icmp_type, 1..=4),
    }
}

/// The ICMP protocol number of the given IP version.
pub(crate) fn icmp_protocol(version: IpVersion) -> u8 {
    match version {
        IpVersion::V4 => proto::ICMP,
        IpVersion::V6 => proto::ICMPV6,
    }
}

/// Result of walking an IPv6 header chain.
#[derive(Clone, Copy, Debug)]
pub(crate) struct V6Chain {
    /// Upper-layer protocol (see [`Summary::protocol`]).
    pub(crate) protocol: u8,
    /// Fragmentation state.
    pub(crate) fragment: Fragment,
    /// Fragment offset in bytes (0 unless a later fragment).
    pub(crate) fragment_offset: usize,
    /// Offset of the upper-layer header, unless a later fragment.
    pub(crate) l4_offset: Option<usize>,
}

/// Walks the IPv6 extension headers of `packet`, which ends at `end`
/// (`packet` may be a truncated quote; anything past `end` is not looked
/// at).
pub(crate) fn walk_ipv6(packet: &[u8], end: usize) -> Result<V6Chain, PacketError> {
    let end = end.min(packet.len());
    let mut next = *packet.get(6).ok_or(PacketError::Truncated)?;
    let mut off = 40usize;
    let mut fragment = Fragment::Whole;
    for _ in 0..=MAX_EXTENSION_HEADERS {
        match next {
            proto::HOP_BY_HOP | proto::ROUTING | proto::DEST_OPTS => {
                if off + 2 > end {
                    return Err(PacketError::BadExtensionHeader);
                }
                let len = (usize::from(packet[off + 1]) + 1) * 8;
                if off + len > end {
                    return Err(PacketError::BadExtensionHeader);
                }
                next = packet[off];
                off += len;
            }
            proto::FRAGMENT => {
                if off + 8 > end {
                    return Err(PacketError::BadExtensionHeader);
                }
                let word = read_u16(packet, off + 2).ok_or(PacketError::BadExtensionHeader)?;
                let offset = usize::from(word & 0xfff8);
                let more = word & 1 != 0;
                next = packet[off];
                off += 8;
                if offset != 0 {
                    return Ok(V6Chain {
                        protocol: next,
                        fragment: Fragment::Later,
                        fragment_offset: offset,
                        l4_offset: None,
                    });
                }
                if more {
                    fragment = Fragment::First;
                }
            }
            _ => {
                return Ok(V6Chain {
                    protocol: next,
                    fragment,
                    fragment_offset: 0,
                    l4_offset: Some(off),
                });
            }
        }
    }
    Err(PacketError::TooManyExtensionHeaders)
}

/// Parses and validates one raw IP packet (no link-layer header).
///
/// Checks the version, the IPv4 header length and total length, the IPv6
/// payload length and extension-header chain (at most
/// [`MAX_EXTENSION_HEADERS`]), and that an unfragmented packet or first
/// fragment holds its whole TCP, UDP or ICMP header. Never panics.
pub fn parse(packet: &[u8]) -> Result<Summary, PacketError> {
    let first = *packet.first().ok_or(PacketError::Truncated)?;
    match first >> 4 {
        4 => parse_v4(packet),
        6 => parse_v6(packet),
        _ => Err(PacketError::BadVersion),
    }
}

fn parse_v4(packet: &[u8]) -> Result<Summary, PacketError> {
    let header: &[u8; 20] = packet
        .get(..20)
        .and_then(|h| h.try_into().ok())
        .ok_or(PacketError::Truncated)?;
    let ihl = usize::from(header[0] & 0x0f) * 4;
    if ihl < 20 {
        return Err(PacketError::BadHeaderLength);
    }
    if packet.len() < ihl {
        return Err(PacketError::Truncated);
    }
    let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    if len > packet.len() || len < ihl {
        return Err(PacketError::BadTotalLength);
    }
    let frag = u16::from_be_bytes([header[6], header[7]]);
    let offset = usize::from(frag & 0x1fff) * 8;
    let more = frag & 0x2000 != 0;
    let protocol = header[9];
    let fragment = match (offset, more) {
        (0, false) => Fragment::Whole,
        (0, true) => Fragment::First,
        _ => Fragment::Later,
    };
    let src = Ipv4Addr::new(header[12], header[13], header[14], header[15]);
    let dst = Ipv4Addr::new(header[16], header[17], header[18], header[19]);
    let mut summary = Summary {
        version: IpVersion::V4,
        src: IpAddr::V4(src),
        dst: IpAddr::V4(dst),
        protocol,
        fragment,
        len,
        l4_offset: None,
        tcp_flags: None,
        src_port: None,
        dst_port: None,
        icmp_type: None,
        icmp_code: None,
    };
    if fragment == Fragment::Later {
        if protocol == proto::TCP && offset < 20 {
            return Err(PacketError::TinyFragment);
        }
        return Ok(summary);
    }
    transport(&packet[..len], ihl, &mut summary)?;
    Ok(summary)
}

fn parse_v6(packet: &[u8]) -> Result<Summary, PacketError> {
    let header: &[u8; 40] = packet
        .get(..40)
        .and_then(|h| h.try_into().ok())
        .ok_or(PacketError::Truncated)?;
    let len = 40 + usize::from(u16::from_be_bytes([header[4], header[5]]));
    if len > packet.len() {
        return Err(PacketError::BadTotalLength);
    }
    let mut src = [0u8; 16];
    src.copy_from_slice(&header[8..24]);
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&header[24..40]);
    let packet = &packet[..len];
    let chain = walk_ipv6(packet, len)?;
    let mut summary = Summary {
        version: IpVersion::V6,
        src: IpAddr::V6(Ipv6Addr::from(src)),
        dst: IpAddr::V6(Ipv6Addr::from(dst)),
        protocol: chain.protocol,
        fragment: chain.fragment,
        len,
        l4_offset: None,
        tcp_flags: None,
        src_port: None,
        dst_port: None,
        icmp_type: None,
        icmp_code: None,
    };
    match chain.l4_offset {
        None => {
            if chain.protocol == proto::TCP && chain.fragment_offset < 20 {
                return Err(PacketError::TinyFragment);
            }
        }
        Some(l4) => transport(packet, l4, &mut summary)?,
    }
    Ok(summary)
}

/// Fills in the transport fields of `summary` from the header at `l4`
/// (`packet` ends at the packet's length).
fn transport(packet: &[u8], l4: usize, summary: &mut Summary) -> Result<(), PacketError> {
    summary.l4_offset = Some(l4);
    let seg = packet.get(l4..).ok_or(PacketError::TruncatedTransport)?;
    let icmp = icmp_protocol(summary.version);
    match summary.protocol {
        proto::TCP => {
            if seg.len() < 20 {
                return Err(PacketError::TruncatedTransport);
            }
            let data_offset = usize::from(seg[12] >> 4) * 4;
            if data_offset < 20 {
                return Err(PacketError::BadTcpDataOffset);
            }
            if data_offset > seg.len() {
                return Err(PacketError::TruncatedTransport);
            }
            summary.src_port = Some(u16::from_be_bytes([seg[0], seg[1]]));
            summary.dst_port = Some(u16::from_be_bytes([seg[2], seg[3]]));
            summary.tcp_flags = Some(seg[13]);
        }
        proto::UDP => {
            if seg.len() < 8 {
                return Err(PacketError::TruncatedTransport);
            }
            summary.src_port = Some(u16::from_be_bytes([seg[0], seg[1]]));
            summary.dst_port = Some(u16::from_be_bytes([seg[2], seg[3]]));
        }
        p if p == icmp => {
            if seg.len() < 8 {
                return Err(PacketError::TruncatedTransport);
            }
            summary.icmp_type = Some(seg[0]);
            summary.icmp_code = Some(seg[1]);
        }
        _ => {}
    }
    Ok(())
}
