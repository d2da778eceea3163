//! Stateless prefix translation (NPTv6-style for IPv6, the same for IPv4).

use ipnet::IpNet;

use super::checksum::{Delta, adjust, read_u16, write_tracked};
use super::parse::{
    Fragment, IpVersion, PacketError, Summary, icmp_protocol, parse, proto, walk_ipv6,
};

/// Why a [`View`] could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ViewError {
    /// One prefix is IPv4 and the other IPv6.
    #[error("real CIDR {real} and view CIDR {view} are not the same address family")]
    FamilyMismatch {
        /// The real CIDR.
        real: IpNet,
        /// The view CIDR.
        view: IpNet,
    },
    /// The prefixes have different lengths, so host bits would not carry
    /// over one to one.
    #[error("real CIDR {real} and view CIDR {view} have different prefix lengths")]
    PrefixLengthMismatch {
        /// The real CIDR.
        real: IpNet,
        /// The view CIDR.
        view: IpNet,
    },
}

/// How this site sees one peer CIDR: the peer's `real` CIDR and the local
/// `view` of it (same family and prefix length; equal when no remapping is
/// needed).
///
/// Egress to the peer rewrites the destination `view → real`
/// ([`View::egress`]); ingress from the peer rewrites the source
/// `real → view` ([`View::ingress`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct View {
    real: IpNet,
    view: IpNet,
}

impl View {
    /// Builds a mapping. Host bits in either CIDR are ignored (the networks
    /// are truncated).
    pub fn new(real: IpNet, view: IpNet) -> Result<View, ViewError> {
        let (real, view) = (real.trunc(), view.trunc());
        match (real, view) {
            (IpNet::V4(_), IpNet::V4(_)) | (IpNet::V6(_), IpNet::V6(_)) => {}
            _ => return Err(ViewError::FamilyMismatch { real, view }),
        }
        if real.prefix_len() != view.prefix_len() {
            return Err(ViewError::PrefixLengthMismatch { real, view });
        }
        Ok(View { real, view })
    }

    /// The peer's real CIDR.
    pub fn real(&self) -> &IpNet {
        &self.real
    }

    /// The local view of that CIDR.
    pub fn view(&self) -> &IpNet {
        &self.view
    }

    /// The view that leaves the real CIDR as it is.
    pub fn identity(real: IpNet) -> View {
        let real = real.trunc();
        View { real, view: real }
    }

    /// Whether the view differs from the real CIDR, so that the data path
    /// has to rewrite addresses.
    pub fn is_remapped(&self) -> bool {
        self.real != self.view
    }

    /// Egress towards the peer: destination `view → real`. See
    /// [`translate_dst`].
    pub fn egress(&self, packet: &mut [u8]) -> Result<bool, PacketError> {
        translate_dst(packet, &self.view, &self.real)
    }

    /// Ingress from the peer: source `real → view`. See [`translate_src`].
    pub fn ingress(&self, packet: &mut [u8]) -> Result<bool, PacketError> {
        translate_src(packet, &self.real, &self.view)
    }

    /// [`View::egress`] of a packet the caller already parsed into
    /// `summary` (the data path does, for its own checks).
    pub fn egress_parsed(&self, packet: &mut [u8], summary: &Summary) -> Result<bool, PacketError> {
        translate_parsed(packet, summary, &self.view, &self.real, Side::Dst)
    }

    /// [`View::ingress`] of a packet the caller already parsed into
    /// `summary`.
    pub fn ingress_parsed(
        &self,
        packet: &mut [u8],
        summary: &Summary,
    ) -> Result<bool, PacketError> {
        translate_parsed(packet, summary, &self.real, &self.view, Side::Src)
    }
}

impl std::fmt::Display for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_remapped() {
            write!(f, "{} seen as {}", self.real, self.view)
        } else {
            write!(f, "{}", self.real)
        }
    }
}

/// Which address of a header is rewritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Src,
    Dst,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::Src => Side::Dst,
            Side::Dst => Side::Src,
        }
    }

    /// Offset of this address in an IP header of the given version.
    fn offset(self, version: IpVersion) -> usize {
        match (version, self) {
            (IpVersion::V4, Side::Src) => 12,
            (IpVersion::V4, Side::Dst) => 16,
            (IpVersion::V6, Side::Src) => 8,
            (IpVersion::V6, Side::Dst) => 24,
        }
    }
}

/// Rewrites the destination address if it lies inside `from`: its prefix
/// bits are replaced with those of `to`, its host bits are kept. Returns
/// `Ok(true)` if the packet was rewritten, `Ok(false)` if the destination is
/// not inside `from` (the packet is untouched).
///
/// Checksums are updated incrementally (RFC 1624): the IPv4 header, TCP, UDP
/// (a zero UDP checksum means "none" and stays zero) and ICMPv6 (all three
/// cover the addresses through the pseudo-header). Only a packet that carries
/// the transport header (not a later fragment) has it updated; for a first
/// fragment the delta is valid for the reassembled datagram.
///
/// For an ICMP or ICMPv6 error (ICMPv4 types 3, 4, 5, 11, 12; ICMPv6 types 1
/// to 4) the quoted packet's *source* is translated with the same prefixes
/// when it lies inside `from` (the quote is a packet the error's recipient
/// sent), along with the quote's IPv4 header checksum and its TCP, UDP or
/// ICMPv6 checksum when those bytes are present in the (often truncated)
/// quote; every changed word is folded into the outer ICMP checksum. The
/// quote is translated one level deep only.
///
/// Errors: anything [`parse()`] rejects, and
/// [`PacketError::MismatchedPrefixes`] when `from` and `to` differ in family
/// or prefix length.
pub fn translate_dst(packet: &mut [u8], from: &IpNet, to: &IpNet) -> Result<bool, PacketError> {
    translate(packet, from, to, Side::Dst)
}

/// Rewrites the source address if it lies inside `from`, exactly like
/// [`translate_dst`] does for the destination; for an ICMP error the quoted
/// packet's *destination* is translated (the quote is a packet sent towards
/// the translated source).
pub fn translate_src(packet: &mut [u8], from: &IpNet, to: &IpNet) -> Result<bool, PacketError> {
    translate(packet, from, to, Side::Src)
}

fn check_prefixes(from: &IpNet, to: &IpNet) -> Result<(), PacketError> {
    let same_family = matches!(
        (from, to),
        (IpNet::V4(_), IpNet::V4(_)) | (IpNet::V6(_), IpNet::V6(_))
    );
    if !same_family || from.prefix_len() != to.prefix_len() {
        return Err(PacketError::MismatchedPrefixes);
    }
    Ok(())
}

/// The address `addr` translated from `from` to `to`, as bytes, or `None`
/// if it is not inside `from` (or is of another family).
fn map_addr(addr: &[u8], from: &IpNet, to: &IpNet) -> Option<Addr> {
    match (from, to) {
        (IpNet::V4(from), IpNet::V4(to)) => {
            let a = u32::from_be_bytes(addr.try_into().ok()?);
            let mask = u32::from(from.netmask());
            if a & mask != u32::from(from.network()) & mask {
                return None;
            }
            let new = (a & !mask) | (u32::from(to.network()) & mask);
            Some(Addr::V4(new.to_be_bytes()))
        }
        (IpNet::V6(from), IpNet::V6(to)) => {
            let a = u128::from_be_bytes(addr.try_into().ok()?);
            let mask = u128::from(from.netmask());
            if a & mask != u128::from(from.network()) & mask {
                return None;
            }
            let new = (a & !mask) | (u128::from(to.network()) & mask);
            Some(Addr::V6(new.to_be_bytes()))
        }
        _ => None,
    }
}

/// A translated address, kept on the stack.
#[derive(Clone, Copy)]
enum Addr {
    V4([u8; 4]),
    V6([u8; 16]),
}

impl Addr {
    fn bytes(&self) -> &[u8] {
        match self {
            Addr::V4(b) => b,
            Addr::V6(b) => b,
        }
    }
}

fn addr_len(version: IpVersion) -> usize {
    match version {
        IpVersion::V4 => 4,
        IpVersion::V6 => 16,
    }
}

fn translate(packet: &mut [u8], from: &IpNet, to: &IpNet, side: Side) -> Result<bool, PacketError> {
    check_prefixes(from, to)?;
    let summary = parse(packet)?;
    translate_parsed(packet, &summary, from, to, side)
}

/// [`translate`] of a packet already parsed into `summary`, with prefixes
/// already known to match (a [`View`]'s always do).
fn translate_parsed(
    packet: &mut [u8],
    summary: &Summary,
    from: &IpNet,
    to: &IpNet,
    side: Side,
) -> Result<bool, PacketError> {
    let family_matches = matches!(
        (summary.version, from),
        (IpVersion::V4, IpNet::V4(_)) | (IpVersion::V6, IpNet::V6(_))
    );
    if !family_matches {
        return Ok(false);
    }
    // `parse` guarantees `len <= packet.len()`.
    let Some(packet) = packet.get_mut(..summary.len) else {
        return Err(PacketError::BadTotalLength);
    };
    let at = side.offset(summary.version);
    let len = addr_len(summary.version);
    let Some(new) = packet
        .get(at..at + len)
        .and_then(|old| map_addr(old, from, to))
    else {
        return Ok(false);
    };
    let Some(addr_delta) = write_tracked(packet, 0, at, new.bytes()) else {
        return Err(PacketError::Truncated);
    };
    if summary.version == IpVersion::V4 {
        adjust(packet, 10, addr_delta, false);
    }
    if let Some(l4) = summary.l4_offset {
        translate_transport(packet, summary, l4, addr_delta, from, to, side);
    }
    Ok(true)
}

/// Updates the transport checksum after the outer address changed by
/// `addr_delta`, translating an ICMP error's quote on the way.
fn translate_transport(
    packet: &mut [u8],
    summary: &Summary,
    l4: usize,
    addr_delta: Delta,
    from: &IpNet,
    to: &IpNet,
    side: Side,
) {
    let Some(segment) = packet.get_mut(l4..) else {
        return;
    };
    let icmp = icmp_protocol(summary.version);
    match summary.protocol {
        proto::TCP => {
            adjust(segment, 16, addr_delta, false);
        }
        proto::UDP => {
            adjust(segment, 6, addr_delta, true);
        }
        p if p == icmp => {
            // ICMPv4 has no pseudo-header; ICMPv6 does.
            let mut delta = match summary.version {
                IpVersion::V4 => Delta::ZERO,
                IpVersion::V6 => addr_delta,
            };
            if summary.is_icmp_error() {
                delta.add(translate_quote(
                    segment,
                    summary.version,
                    from,
                    to,
                    side.other(),
                ));
            }
            adjust(segment, 2, delta, false);
        }
        _ => {}
    }
}

/// Translates the `side` address of the packet quoted in an ICMP error
/// (`icmp` is the ICMP message, the quote starts at byte 8) and returns the
/// change to the ICMP message's checksum. Only bytes that are present are
/// touched; the quote is not followed further (one level only).
fn translate_quote(
    icmp: &mut [u8],
    version: IpVersion,
    from: &IpNet,
    to: &IpNet,
    side: Side,
) -> Delta {
    let mut body = Delta::ZERO;
    let Some(quote) = icmp.get_mut(8..) else {
        return body;
    };
    let Some(&first) = quote.first() else {
        return body;
    };
    let header_len = match (version, first >> 4) {
        (IpVersion::V4, 4) => usize::from(first & 0x0f) * 4,
        (IpVersion::V6, 6) => 40,
        _ => return body,
    };
    // The fixed header holds both addresses and the IPv4 header checksum.
    let fixed = match version {
        IpVersion::V4 => 20,
        IpVersion::V6 => 40,
    };
    if header_len < fixed || quote.len() < fixed {
        return body;
    }
    let at = side.offset(version);
    let len = addr_len(version);
    let Some(new) = quote
        .get(at..at + len)
        .and_then(|old| map_addr(old, from, to))
    else {
        return body;
    };
    // The quote starts at an even offset of the ICMP message, so its words
    // line up with the ICMP checksum's.
    let Some(addr_delta) = write_tracked(quote, 0, at, new.bytes()) else {
        return body;
    };
    body.add(addr_delta);

    // Where the quoted transport header starts, if it is in the quote at all.
    let (protocol, l4) = match version {
        IpVersion::V4 => {
            if let Some(change) = adjust(quote, 10, addr_delta, false) {
                body.add(change);
            }
            let fragment_offset = read_u16(quote, 6).map_or(1, |w| w & 0x1fff);
            if fragment_offset != 0 {
                return body;
            }
            (quote[9], header_len)
        }
        IpVersion::V6 => match walk_ipv6(quote, quote.len()) {
            Ok(chain) => match (chain.fragment, chain.l4_offset) {
                (Fragment::Whole | Fragment::First, Some(l4)) => (chain.protocol, l4),
                _ => return body,
            },
            Err(_) => return body,
        },
    };
    let Some(segment) = quote.get_mut(l4..) else {
        return body;
    };
    let change = match protocol {
        proto::TCP => adjust(segment, 16, addr_delta, false),
        proto::UDP => adjust(segment, 6, addr_delta, true),
        proto::ICMPV6 if version == IpVersion::V6 => adjust(segment, 2, addr_delta, false),
        _ => None,
    };
    if let Some(change) = change {
        body.add(change);
    }
    body
}
