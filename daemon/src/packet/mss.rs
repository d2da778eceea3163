//! TCP MSS clamping for SYN and SYN-ACK segments.

use super::checksum::{adjust, read_u16, write_tracked};
use super::parse::{parse, proto, tcp_flags};

/// TCP option kinds walked by [`clamp_mss`].
const OPT_EOL: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_MSS: u8 = 2;

/// The largest TCP MSS whose segments fit a tunnel of `tunnel_mtu` bytes
/// without fragmentation: the MTU minus the minimal IP and TCP headers
/// (40 bytes for IPv4, 60 for IPv6). Saturates at 0.
pub fn max_mss(tunnel_mtu: u16, ipv6: bool) -> u16 {
    tunnel_mtu.saturating_sub(if ipv6 { 60 } else { 40 })
}

/// Lowers the MSS option of a TCP SYN or SYN-ACK to `max_mss` when it is
/// larger, fixing the TCP checksum incrementally. Returns whether the packet
/// changed.
///
/// The options are walked as RFC 9293 lays them out (EOL ends the list, NOP
/// is one byte, every other option is kind + length); the walk stops quietly
/// at a malformed length. Every well-formed MSS option (kind 2, length 4)
/// is clamped. Anything that is not a TCP segment with SYN set carrying its
/// header, or that [`parse()`] rejects, is left alone.
pub fn clamp_mss(packet: &mut [u8], max_mss: u16) -> bool {
    let Ok(summary) = parse(packet) else {
        return false;
    };
    if summary.protocol != proto::TCP || summary.tcp_flags.is_none_or(|f| f & tcp_flags::SYN == 0) {
        return false;
    }
    let Some(l4) = summary.l4_offset else {
        return false;
    };
    // `parse` checked that the whole TCP header is inside the packet.
    let Some(segment) = packet.get_mut(l4..summary.len) else {
        return false;
    };
    let Some(&offset_byte) = segment.get(12) else {
        return false;
    };
    let header_len = usize::from(offset_byte >> 4) * 4;
    if header_len > segment.len() {
        return false;
    }
    let mut changed = false;
    let mut i = 20;
    while i < header_len {
        match segment[i] {
            OPT_EOL => break,
            OPT_NOP => i += 1,
            kind => {
                let Some(&len) = segment.get(i + 1) else {
                    break;
                };
                let len = usize::from(len);
                if len < 2 || i + len > header_len {
                    break;
                }
                if kind == OPT_MSS && len == 4 {
                    let Some(mss) = read_u16(segment, i + 2) else {
                        break;
                    };
                    if mss > max_mss {
                        // The option may start at any offset: `write_tracked`
                        // handles words that straddle it.
                        if let Some(delta) =
                            write_tracked(segment, 0, i + 2, &max_mss.to_be_bytes())
                        {
                            adjust(segment, 16, delta, false);
                            changed = true;
                        }
                    }
                }
                i += len;
            }
        }
    }
    changed
}
