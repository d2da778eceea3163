//! Test-only packet builder and checksum verifier.
//!
//! Deliberately independent of the code under test: checksums are computed
//! in full with etherparse's `Sum16BitWords`, and [`verify`] parses with
//! etherparse and checks with its own checksum functions.

use std::net::IpAddr;

use etherparse::checksum::Sum16BitWords;
use etherparse::{IpNumber, IpSlice, Ipv4HeaderSlice, TcpSlice, UdpSlice};

/// An IPv6 extension header (`body` excludes next-header and length; its
/// length must be 6 + 8k).
#[derive(Clone, Debug)]
pub(super) enum Ext {
    HopByHop(Vec<u8>),
    Routing(Vec<u8>),
    DestOpts(Vec<u8>),
}

impl Ext {
    fn number(&self) -> u8 {
        match self {
            Ext::HopByHop(_) => 0,
            Ext::Routing(_) => 43,
            Ext::DestOpts(_) => 60,
        }
    }

    fn body(&self) -> &[u8] {
        match self {
            Ext::HopByHop(b) | Ext::Routing(b) | Ext::DestOpts(b) => b,
        }
    }
}

/// Transport content (an ICMP error is an `Icmp` whose payload is the
/// quote).
#[derive(Clone, Debug)]
pub(super) enum L4 {
    Tcp {
        src_port: u16,
        dst_port: u16,
        seq: u32,
        flags: u8,
        /// Raw option bytes, a multiple of 4 long.
        options: Vec<u8>,
        payload: Vec<u8>,
    },
    Udp {
        src_port: u16,
        dst_port: u16,
        payload: Vec<u8>,
        /// Send a zero ("no") checksum.
        no_checksum: bool,
    },
    Icmp {
        icmp_type: u8,
        code: u8,
        rest: [u8; 4],
        payload: Vec<u8>,
    },
}

/// A packet to build.
#[derive(Clone, Debug)]
pub(super) struct Spec {
    pub(super) src: IpAddr,
    pub(super) dst: IpAddr,
    pub(super) ttl: u8,
    pub(super) id: u16,
    pub(super) df: bool,
    /// IPv4 options (a multiple of 4 long, at most 40).
    pub(super) v4_options: Vec<u8>,
    /// IPv6 extension headers (a hop-by-hop header must come first).
    pub(super) ext: Vec<Ext>,
    pub(super) l4: L4,
}

fn pseudo_sum(src: IpAddr, dst: IpAddr, protocol: u8, len: usize) -> Sum16BitWords {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Sum16BitWords::new()
            .add_slice(&s.octets())
            .add_slice(&d.octets())
            .add_2bytes([0, protocol])
            .add_2bytes((len as u16).to_be_bytes()),
        (IpAddr::V6(s), IpAddr::V6(d)) => Sum16BitWords::new()
            .add_slice(&s.octets())
            .add_slice(&d.octets())
            .add_slice(&(len as u32).to_be_bytes())
            .add_slice(&[0, 0, 0, protocol]),
        _ => panic!("mixed families"),
    }
}

impl Spec {
    pub(super) fn is_v6(&self) -> bool {
        self.src.is_ipv6()
    }

    /// Protocol number and transport bytes with correct checksums.
    fn transport(&self) -> (u8, Vec<u8>) {
        match &self.l4 {
            L4::Tcp {
                src_port,
                dst_port,
                seq,
                flags,
                options,
                payload,
            } => {
                let mut b = Vec::new();
                b.extend_from_slice(&src_port.to_be_bytes());
                b.extend_from_slice(&dst_port.to_be_bytes());
                b.extend_from_slice(&seq.to_be_bytes());
                b.extend_from_slice(&seq.rotate_left(7).to_be_bytes());
                b.push((((20 + options.len()) / 4) as u8) << 4);
                b.push(*flags);
                b.extend_from_slice(&[0xfa, 0xf0, 0, 0, 0, 0]);
                b.extend_from_slice(options);
                b.extend_from_slice(payload);
                let c = pseudo_sum(self.src, self.dst, 6, b.len())
                    .add_slice(&b)
                    .ones_complement()
                    .to_be();
                b[16..18].copy_from_slice(&c.to_be_bytes());
                (6, b)
            }
            L4::Udp {
                src_port,
                dst_port,
                payload,
                no_checksum,
            } => {
                let mut b = Vec::new();
                b.extend_from_slice(&src_port.to_be_bytes());
                b.extend_from_slice(&dst_port.to_be_bytes());
                b.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
                b.extend_from_slice(&[0, 0]);
                b.extend_from_slice(payload);
                if !no_checksum {
                    let c = pseudo_sum(self.src, self.dst, 17, b.len())
                        .add_slice(&b)
                        .to_ones_complement_with_no_zero()
                        .to_be();
                    b[6..8].copy_from_slice(&c.to_be_bytes());
                }
                (17, b)
            }
            L4::Icmp {
                icmp_type,
                code,
                rest,
                payload,
            } => self.icmp(*icmp_type, *code, *rest, payload),
        }
    }

    fn icmp(&self, icmp_type: u8, code: u8, rest: [u8; 4], body: &[u8]) -> (u8, Vec<u8>) {
        let mut b = vec![icmp_type, code, 0, 0];
        b.extend_from_slice(&rest);
        b.extend_from_slice(body);
        let (protocol, sum) = if self.is_v6() {
            (58, pseudo_sum(self.src, self.dst, 58, b.len()))
        } else {
            (1, Sum16BitWords::new())
        };
        let c = sum.add_slice(&b).ones_complement().to_be();
        b[2..4].copy_from_slice(&c.to_be_bytes());
        (protocol, b)
    }

    /// The packet, with every checksum computed in full.
    pub(super) fn build(&self) -> Vec<u8> {
        let (protocol, l4) = self.transport();
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let hl = 20 + self.v4_options.len();
                let mut p = vec![0x40 | (hl / 4) as u8, 0];
                p.extend_from_slice(&((hl + l4.len()) as u16).to_be_bytes());
                p.extend_from_slice(&self.id.to_be_bytes());
                p.extend_from_slice(&(if self.df { 0x4000u16 } else { 0 }).to_be_bytes());
                p.extend_from_slice(&[self.ttl, protocol, 0, 0]);
                p.extend_from_slice(&s.octets());
                p.extend_from_slice(&d.octets());
                p.extend_from_slice(&self.v4_options);
                set_v4_checksum(&mut p);
                p.extend_from_slice(&l4);
                p
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let ext_len: usize = self.ext.iter().map(|e| 2 + e.body().len()).sum();
                let first = self.ext.first().map_or(protocol, Ext::number);
                let mut p = vec![0x60, 0, 0, 0];
                p.extend_from_slice(&((ext_len + l4.len()) as u16).to_be_bytes());
                p.extend_from_slice(&[first, self.ttl]);
                p.extend_from_slice(&s.octets());
                p.extend_from_slice(&d.octets());
                for (i, e) in self.ext.iter().enumerate() {
                    let next = self.ext.get(i + 1).map_or(protocol, Ext::number);
                    assert_eq!(e.body().len() % 8, 6);
                    p.push(next);
                    p.push(((2 + e.body().len()) / 8 - 1) as u8);
                    p.extend_from_slice(e.body());
                }
                p.extend_from_slice(&l4);
                p
            }
            _ => panic!("mixed families"),
        }
    }

    /// Offset of the transport header in the built packet.
    pub(super) fn l4_offset(&self) -> usize {
        if self.is_v6() {
            40 + self.ext.iter().map(|e| 2 + e.body().len()).sum::<usize>()
        } else {
            20 + self.v4_options.len()
        }
    }

    /// Offset of the transport checksum inside the transport header when it
    /// covers the addresses (TCP, UDP, ICMPv6).
    pub(super) fn l4_checksum_offset(&self) -> Option<usize> {
        match &self.l4 {
            L4::Tcp { .. } => Some(16),
            L4::Udp { .. } => Some(6),
            L4::Icmp { .. } if self.is_v6() => Some(2),
            L4::Icmp { .. } => None,
        }
    }

    /// Where the fragmentable part starts and how many of its bytes must
    /// stay in the first fragment (its extension headers + the transport
    /// header).
    pub(super) fn fragmentable(&self) -> (usize, usize) {
        let l4_header = match &self.l4 {
            L4::Tcp { options, .. } => 20 + options.len(),
            _ => 8,
        };
        if self.is_v6() {
            let hbh = match self.ext.first() {
                Some(e @ Ext::HopByHop(_)) => 2 + e.body().len(),
                _ => 0,
            };
            let ext_len: usize = self.ext.iter().map(|e| 2 + e.body().len()).sum();
            (40 + hbh, ext_len - hbh + l4_header)
        } else {
            (20 + self.v4_options.len(), l4_header)
        }
    }
}

/// Recomputes an IPv4 header checksum in full.
pub(super) fn set_v4_checksum(p: &mut [u8]) {
    let hl = usize::from(p[0] & 0x0f) * 4;
    p[10] = 0;
    p[11] = 0;
    let c = Sum16BitWords::new()
        .add_slice(&p[..hl])
        .ones_complement()
        .to_be();
    p[10..12].copy_from_slice(&c.to_be_bytes());
}

/// Splits a whole packet into fragments at the given offsets of its
/// fragmentable part (multiples of 8, increasing). IPv6 fragments get a
/// fragment header after the hop-by-hop header (if any).
pub(super) fn fragment(packet: &[u8], unfragmentable: usize, splits: &[usize]) -> Vec<Vec<u8>> {
    let v6 = packet[0] >> 4 == 6;
    let payload = &packet[unfragmentable..];
    let mut bounds = vec![0];
    bounds.extend(
        splits
            .iter()
            .copied()
            .filter(|s| *s > 0 && *s < payload.len()),
    );
    bounds.push(payload.len());
    bounds.dedup();
    let mut out = Vec::new();
    for w in bounds.windows(2) {
        let (start, end) = (w[0], w[1]);
        assert_eq!(start % 8, 0);
        let more = end < payload.len();
        let mut f = packet[..unfragmentable].to_vec();
        if v6 {
            // Point the last unfragmentable header at the fragment header.
            let (next_at, orig_next) = if unfragmentable == 40 {
                (6, packet[6])
            } else {
                (40, packet[40])
            };
            f[next_at] = 44;
            f.push(orig_next);
            f.push(0);
            f.extend_from_slice(&((start as u16) | u16::from(more)).to_be_bytes());
            f.extend_from_slice(&0x1234_5678u32.to_be_bytes());
            f.extend_from_slice(&payload[start..end]);
            let plen = (f.len() - 40) as u16;
            f[4..6].copy_from_slice(&plen.to_be_bytes());
        } else {
            f.extend_from_slice(&payload[start..end]);
            let tl = f.len() as u16;
            f[2..4].copy_from_slice(&tl.to_be_bytes());
            let flags = ((start / 8) as u16) | if more { 0x2000 } else { 0 };
            f[6..8].copy_from_slice(&flags.to_be_bytes());
            set_v4_checksum(&mut f);
        }
        out.push(f);
    }
    out
}

/// Undoes [`fragment`].
pub(super) fn reassemble(fragments: &[Vec<u8>], unfragmentable: usize) -> Vec<u8> {
    let v6 = fragments[0][0] >> 4 == 6;
    let mut p = fragments[0][..unfragmentable].to_vec();
    let skip = if v6 {
        unfragmentable + 8
    } else {
        unfragmentable
    };
    if v6 {
        let next_at = if unfragmentable == 40 { 6 } else { 40 };
        p[next_at] = fragments[0][unfragmentable];
    }
    for f in fragments {
        p.extend_from_slice(&f[skip..]);
    }
    if v6 {
        let plen = (p.len() - 40) as u16;
        p[4..6].copy_from_slice(&plen.to_be_bytes());
    } else {
        let tl = p.len() as u16;
        p[2..4].copy_from_slice(&tl.to_be_bytes());
        p[6..8].copy_from_slice(&[0, 0]);
        set_v4_checksum(&mut p);
    }
    p
}

/// Checks every checksum of a whole packet with etherparse: the IPv4 header,
/// TCP, UDP (unless zero in IPv4), ICMP, ICMPv6, and for an ICMP error the
/// quoted IPv4 header and, when the quote is a whole packet, its transport
/// checksum too (one level).
pub(super) fn verify(packet: &[u8]) -> Result<(), String> {
    verify_level(packet, true)
}

fn verify_level(packet: &[u8], outer: bool) -> Result<(), String> {
    let ip = IpSlice::from_slice(packet).map_err(|e| format!("etherparse: {e:?}"))?;
    if let Some(v4) = ip.ipv4() {
        let h = v4.header();
        if h.to_header().calc_header_checksum() != h.header_checksum() {
            return Err("IPv4 header checksum".into());
        }
    }
    let payload = ip.payload();
    if payload.fragmented {
        return Err("fragment: reassemble first".into());
    }
    let (src, dst) = (ip.source_addr(), ip.destination_addr());
    let data = payload.payload;
    match payload.ip_number {
        IpNumber::TCP => {
            let tcp = TcpSlice::from_slice(data).map_err(|e| format!("{e:?}"))?;
            let c = match (src, dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => tcp.calc_checksum_ipv4(s.octets(), d.octets()),
                (IpAddr::V6(s), IpAddr::V6(d)) => tcp.calc_checksum_ipv6(s.octets(), d.octets()),
                _ => unreachable!(),
            }
            .map_err(|e| format!("{e:?}"))?;
            if c != tcp.checksum() {
                return Err(format!("TCP checksum {:#06x} != {c:#06x}", tcp.checksum()));
            }
        }
        IpNumber::UDP => {
            let udp = UdpSlice::from_slice(data).map_err(|e| format!("{e:?}"))?;
            if udp.checksum() == 0 && src.is_ipv4() {
                return Ok(());
            }
            let h = udp.to_header();
            let c = match (src, dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    h.calc_checksum_ipv4_raw(s.octets(), d.octets(), udp.payload())
                }
                (IpAddr::V6(s), IpAddr::V6(d)) => {
                    h.calc_checksum_ipv6_raw(s.octets(), d.octets(), udp.payload())
                }
                _ => unreachable!(),
            }
            .map_err(|e| format!("{e:?}"))?;
            if c != udp.checksum() {
                return Err(format!("UDP checksum {:#06x} != {c:#06x}", udp.checksum()));
            }
        }
        IpNumber::ICMP => {
            if Sum16BitWords::new().add_slice(data).ones_complement() != 0 {
                return Err("ICMP checksum".into());
            }
            if outer && matches!(data.first(), Some(3 | 4 | 5 | 11 | 12)) {
                verify_quote(&data[8..])?;
            }
        }
        IpNumber::IPV6_ICMP => {
            let (IpAddr::V6(s), IpAddr::V6(d)) = (src, dst) else {
                unreachable!()
            };
            let icmp = etherparse::Icmpv6Slice::from_slice(data).map_err(|e| format!("{e:?}"))?;
            if !icmp.is_checksum_valid(s.octets(), d.octets()) {
                return Err("ICMPv6 checksum".into());
            }
            if outer && matches!(data.first(), Some(1..=4)) {
                verify_quote(&data[8..])?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn verify_quote(quote: &[u8]) -> Result<(), String> {
    // A complete quoted packet: verify everything in it.
    if let Ok(ip) = IpSlice::from_slice(quote) {
        let whole_len = match &ip {
            IpSlice::Ipv4(v4) => usize::from(v4.header().total_len()),
            IpSlice::Ipv6(v6) => 40 + usize::from(v6.header().payload_length()),
        };
        if whole_len == quote.len() && !ip.payload().fragmented {
            return verify_level(quote, false).map_err(|e| format!("quote: {e}"));
        }
    }
    // Otherwise at least the quoted IPv4 header, when it is all there.
    let header = match quote.first() {
        Some(b) if b >> 4 == 4 => Ipv4HeaderSlice::from_slice(quote).ok(),
        _ => None,
    };
    match header {
        Some(h) if h.to_header().calc_header_checksum() != h.header_checksum() => {
            Err("quoted IPv4 header checksum".into())
        }
        _ => Ok(()),
    }
}
