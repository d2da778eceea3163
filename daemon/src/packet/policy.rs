//! The per-peer allow-list check for packets coming in from a peer.

use std::ops::RangeInclusive;

use ipnet::IpNet;

use super::parse::{Fragment, IpVersion, Summary, icmp_protocol, proto, tcp_flags};

/// Transport protocol an [`AllowRule`] applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP for IPv4 destinations, ICMPv6 for IPv6 destinations.
    Icmp,
    /// Every protocol.
    Any,
}

impl Proto {
    fn matches(self, summary: &Summary) -> bool {
        match self {
            Proto::Tcp => summary.protocol == proto::TCP,
            Proto::Udp => summary.protocol == proto::UDP,
            Proto::Icmp => summary.protocol == icmp_protocol(summary.version),
            Proto::Any => true,
        }
    }
}

/// One allow-list entry: traffic from the peer to `cidr` (local, after
/// translation) with protocol `proto` and, for TCP and UDP, a destination
/// port in `ports`.
///
/// A rule with `ports` set matches only TCP and UDP packets that carry their
/// header: `proto = any` with ports means "TCP or UDP to those ports", and
/// `proto = icmp` with ports matches nothing (the configuration should
/// reject that combination).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AllowRule {
    /// Local destination prefix.
    pub cidr: IpNet,
    /// Protocol.
    pub proto: Proto,
    /// Destination ports (TCP and UDP only); `None` for all.
    pub ports: Option<RangeInclusive<u16>>,
}

impl AllowRule {
    /// A rule allowing everything to `cidr` (the default for each local pod
    /// CIDR).
    pub fn any(cidr: IpNet) -> AllowRule {
        AllowRule {
            cidr,
            proto: Proto::Any,
            ports: None,
        }
    }
}

/// Why a packet was allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AllowReason {
    /// The rule at this index in the list matched.
    Rule(usize),
    /// A TCP segment without SYN, or a SYN-ACK: it cannot open a connection.
    TcpNotOpening,
    /// An ICMP echo reply (IPv4 type 0, ICMPv6 type 129).
    IcmpEchoReply,
    /// An ICMP error about a flow: destination unreachable (including
    /// fragmentation needed / packet too big), time exceeded, parameter
    /// problem.
    IcmpError,
    /// A later fragment (its first fragment carried the header that was
    /// checked).
    LaterFragment,
}

/// Why a packet was denied, from the least to the most specific miss; the
/// daemon counts drops per peer and reason ([`DenyReason::label`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DenyReason {
    /// No rule covers the destination address.
    NoRuleMatched,
    /// A rule covers the destination, but not this protocol.
    ProtocolNotAllowed,
    /// A rule covers the destination and protocol, but not this port.
    PortNotAllowed,
}

impl DenyReason {
    /// Every variant, for pre-registering metric labels.
    pub const ALL: [DenyReason; 3] = [
        DenyReason::NoRuleMatched,
        DenyReason::ProtocolNotAllowed,
        DenyReason::PortNotAllowed,
    ];

    /// A short snake_case name for metrics and logs.
    pub const fn label(self) -> &'static str {
        match self {
            DenyReason::NoRuleMatched => "no_rule_matched",
            DenyReason::ProtocolNotAllowed => "protocol_not_allowed",
            DenyReason::PortNotAllowed => "port_not_allowed",
        }
    }
}

/// The outcome of [`allowed`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Deliver the packet.
    Allow(AllowReason),
    /// Drop (and count) the packet.
    Deny(DenyReason),
}

impl Verdict {
    /// Whether the packet may be delivered.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Verdict::Allow(_))
    }
}

/// Checks a packet that came in from a peer (after translation, so the
/// destination is a local address) against that peer's allow-list.
///
/// A packet matching any rule is allowed (the first matching rule is
/// reported). Otherwise the stateless reply rule applies (see the module
/// documentation of [`crate::packet`]): TCP without a bare SYN, ICMP echo
/// replies, ICMP errors about flows and later fragments are allowed; the
/// rest is denied with the most specific reason any rule came to.
pub fn allowed(rules: &[AllowRule], summary: &Summary) -> Verdict {
    let mut miss = DenyReason::NoRuleMatched;
    for (index, rule) in rules.iter().enumerate() {
        if !rule.cidr.contains(&summary.dst) {
            continue;
        }
        if !rule.proto.matches(summary) {
            miss = miss.max(DenyReason::ProtocolNotAllowed);
            continue;
        }
        if let Some(ports) = &rule.ports {
            let tcp_or_udp = matches!(summary.protocol, proto::TCP | proto::UDP);
            match summary.dst_port {
                Some(port) if tcp_or_udp && ports.contains(&port) => {}
                _ => {
                    miss = miss.max(DenyReason::PortNotAllowed);
                    continue;
                }
            }
        }
        return Verdict::Allow(AllowReason::Rule(index));
    }
    match reply(summary) {
        Some(reason) => Verdict::Allow(reason),
        None => Verdict::Deny(miss),
    }
}

/// The stateless reply rule: packets that cannot open anything.
fn reply(summary: &Summary) -> Option<AllowReason> {
    if summary.fragment == Fragment::Later {
        return Some(AllowReason::LaterFragment);
    }
    if summary.protocol == proto::TCP {
        let flags = summary.tcp_flags?;
        let bare_syn = flags & tcp_flags::SYN != 0 && flags & tcp_flags::ACK == 0;
        return (!bare_syn).then_some(AllowReason::TcpNotOpening);
    }
    if summary.protocol == icmp_protocol(summary.version) {
        let icmp_type = summary.icmp_type?;
        return match (summary.version, icmp_type) {
            (IpVersion::V4, 0) | (IpVersion::V6, 129) => Some(AllowReason::IcmpEchoReply),
            // Destination unreachable, time exceeded, parameter problem.
            // Not source quench (4, deprecated) nor redirect (5): neither is
            // about a flow the pod needs to hear about.
            (IpVersion::V4, 3 | 11 | 12) => Some(AllowReason::IcmpError),
            // Destination unreachable, packet too big, time exceeded,
            // parameter problem.
            (IpVersion::V6, 1..=4) => Some(AllowReason::IcmpError),
            _ => None,
        };
    }
    None
}
