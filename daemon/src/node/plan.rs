//! What the node should look like, as pure functions: which gateway is
//! active, which routes go where, and the nftables table.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

use super::config::Encapsulation;
use crate::cluster::Announcement;

/// The nftables table the node agent owns (`inet causeway_node`).
pub const NFT_TABLE: &str = "causeway_node";

/// What the node agent knows of one gateway address.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GatewayState {
    /// Its last announcement.
    pub announcement: Option<Announcement>,
    /// Whether the connection is up (the last announcement is current).
    pub reachable: bool,
}

/// The active gateway among those heard: reachable and saying it is
/// active; of two, the higher term, then the lower address.
pub fn active(
    gateways: &BTreeMap<SocketAddr, GatewayState>,
) -> Option<(SocketAddr, &Announcement)> {
    gateways
        .iter()
        .filter(|(_, g)| g.reachable)
        .filter_map(|(addr, g)| g.announcement.as_ref().map(|a| (*addr, a)))
        .filter(|(_, a)| a.active)
        .max_by(|(x_addr, x), (y_addr, y)| x.term.cmp(&y.term).then_with(|| y_addr.cmp(x_addr)))
}

/// How the node's routes reach the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// This node is the active gateway: its own routes through the TUN
    /// carry the traffic; the node agent installs none.
    Local,
    /// A route `via` the gateway's address.
    Direct(IpAddr),
    /// Through the node's VXLAN device to the gateway's address.
    Vxlan {
        /// The gateway's underlay address.
        remote: IpAddr,
        /// VXLAN network identifier.
        vni: u32,
        /// VXLAN UDP port.
        port: u16,
    },
}

/// The whole wanted state of the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The site, for logs.
    pub site: String,
    /// The peers' view CIDRs.
    pub views: Vec<IpNet>,
    /// The site's pod CIDRs.
    pub pod_cidrs: Vec<IpNet>,
    /// How the views are reached.
    pub path: Path,
    /// The source address for host-originated IPv4 traffic to the views;
    /// `None`: such traffic is dropped (and counted), never sent with an
    /// address the peers refuse.
    pub snat_v4: Option<Ipv4Addr>,
    /// The same for IPv6.
    pub snat_v6: Option<Ipv6Addr>,
}

/// Settings that shape the plan besides what the gateway says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Local<'a> {
    /// Every address of this host with its prefix length.
    pub addresses: &'a [IpNet],
    /// How to reach a gateway.
    pub encapsulation: Encapsulation,
    /// Overrides of the host source NAT address.
    pub snat_v4: Option<Ipv4Addr>,
    /// The same for IPv6.
    pub snat_v6: Option<Ipv6Addr>,
}

/// The plan for following the gateway reached at `at` that announced `a`.
pub fn plan(at: SocketAddr, a: &Announcement, local: Local<'_>) -> Plan {
    let target = a.route_via.unwrap_or(at.ip());
    let is_local = local.addresses.iter().any(|net| net.addr() == target);
    let on_link = local
        .addresses
        .iter()
        .any(|net| net.prefix_len() < net.max_prefix_len() && net.contains(&target));
    let vxlan = Path::Vxlan {
        remote: target,
        vni: a.vxlan_vni,
        port: a.vxlan_port,
    };
    let path = if is_local {
        Path::Local
    } else {
        match local.encapsulation {
            Encapsulation::Direct => Path::Direct(target),
            Encapsulation::Vxlan => vxlan,
            Encapsulation::Auto if on_link => Path::Direct(target),
            Encapsulation::Auto => vxlan,
        }
    };
    let in_pods = |ip: IpAddr| a.pod_cidrs.iter().any(|net| net.contains(&ip));
    let snat_v4 = local.snat_v4.or_else(|| {
        local.addresses.iter().find_map(|net| match net.addr() {
            IpAddr::V4(v4) if in_pods(v4.into()) => Some(v4),
            _ => None,
        })
    });
    let snat_v6 = local.snat_v6.or_else(|| {
        local.addresses.iter().find_map(|net| match net.addr() {
            IpAddr::V6(v6) if in_pods(v6.into()) => Some(v6),
            _ => None,
        })
    });
    Plan {
        site: a.site.clone(),
        views: a.views.clone(),
        pod_cidrs: a.pod_cidrs.clone(),
        path,
        snat_v4,
        snat_v6,
    }
}

fn set(out: &mut String, name: &str, kind: &str, nets: &[IpNet], v4: bool) {
    let elements: Vec<String> = nets
        .iter()
        .filter(|n| matches!(n, IpNet::V4(_)) == v4)
        .map(|n| n.to_string())
        .collect();
    let _ = write!(
        out,
        "  set {name} {{ type {kind}; flags interval; auto-merge;"
    );
    if !elements.is_empty() {
        let _ = write!(out, " elements = {{ {} }};", elements.join(", "));
    }
    out.push_str(" }\n");
}

/// The start of a script that replaces our table: creating it first makes
/// the delete succeed when there is none, all in one transaction.
pub fn reset_table() -> String {
    format!("table inet {NFT_TABLE} {{}}\ndelete table inet {NFT_TABLE}\n")
}

/// The nftables script that replaces the node agent's table atomically
/// (`nft -f -`):
///
/// - chain `host_snat` (nat, postrouting, priority srcnat - 10, before any
///   CNI masquerade): traffic this host originates (`fib saddr type
///   local`) to a view gets the plan's source address inside the pod
///   CIDRs, so that the peer accepts it and replies route back here. The
///   rule names the address; it does not depend on the address existing.
/// - chain `host_guard` (filter, output): without a source address for a
///   family, host-originated traffic to views of that family is dropped
///   and counted (`host_dropped`), never sent with a source the peers
///   refuse.
/// - chain `masquerade_check` (filter, postrouting, priority srcnat + 10,
///   after every source NAT): packets to a view whose source is outside
///   the site's pod CIDRs are counted (`masqueraded`): a CNI masquerade
///   the node agent reports.
pub fn nft_script(plan: &Plan) -> String {
    let mut s = String::new();
    s.push_str(&reset_table());
    let _ = writeln!(s, "table inet {NFT_TABLE} {{");
    set(&mut s, "views4", "ipv4_addr", &plan.views, true);
    set(&mut s, "views6", "ipv6_addr", &plan.views, false);
    set(&mut s, "pods4", "ipv4_addr", &plan.pod_cidrs, true);
    set(&mut s, "pods6", "ipv6_addr", &plan.pod_cidrs, false);
    s.push_str("  counter masqueraded {}\n  counter host_dropped {}\n");
    s.push_str(
        "  chain host_snat {\n    type nat hook postrouting priority srcnat - 10; policy accept;\n",
    );
    if let Some(a) = plan.snat_v4 {
        let _ = writeln!(
            s,
            "    fib saddr type local ip daddr @views4 snat ip to {a}"
        );
    }
    if let Some(a) = plan.snat_v6 {
        let _ = writeln!(
            s,
            "    fib saddr type local ip6 daddr @views6 snat ip6 to {a}"
        );
    }
    s.push_str("  }\n");
    s.push_str(
        "  chain host_guard {\n    type filter hook output priority filter; policy accept;\n",
    );
    if plan.snat_v4.is_none() {
        s.push_str("    ip daddr @views4 counter name host_dropped drop\n");
    }
    if plan.snat_v6.is_none() {
        s.push_str("    ip6 daddr @views6 counter name host_dropped drop\n");
    }
    s.push_str("  }\n");
    s.push_str("  chain masquerade_check {\n    type filter hook postrouting priority srcnat + 10; policy accept;\n");
    s.push_str("    ip daddr @views4 ip saddr != @pods4 counter name masqueraded\n");
    s.push_str("    ip6 daddr @views6 ip6 saddr != @pods6 counter name masqueraded\n");
    s.push_str("  }\n}\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(active: bool, term: u64) -> Announcement {
        Announcement {
            site: "a".into(),
            active,
            term,
            pod_cidrs: vec!["10.244.0.0/16".parse().expect("cidr")],
            views: vec!["100.64.0.0/16".parse().expect("cidr")],
            route_via: None,
            vxlan_vni: 7901,
            vxlan_port: 4792,
        }
    }

    fn state(a: Option<Announcement>, reachable: bool) -> GatewayState {
        GatewayState {
            announcement: a,
            reachable,
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn the_active_gateway_is_reachable_active_highest_term_then_lowest_address() {
        let mut g = BTreeMap::new();
        assert_eq!(active(&g), None);
        g.insert(addr("10.0.0.2:7473"), state(Some(ann(false, 9)), true));
        assert_eq!(active(&g), None, "standby only");
        g.insert(addr("10.0.0.3:7473"), state(Some(ann(true, 1)), true));
        assert_eq!(active(&g).map(|x| x.0), Some(addr("10.0.0.3:7473")));
        g.insert(addr("10.0.0.4:7473"), state(Some(ann(true, 2)), true));
        assert_eq!(
            active(&g).map(|x| x.0),
            Some(addr("10.0.0.4:7473")),
            "higher term"
        );
        g.insert(addr("10.0.0.1:7473"), state(Some(ann(true, 2)), true));
        assert_eq!(
            active(&g).map(|x| x.0),
            Some(addr("10.0.0.1:7473")),
            "same term: lower address"
        );
        g.insert(addr("10.0.0.1:7473"), state(Some(ann(true, 2)), false));
        assert_eq!(
            active(&g).map(|x| x.0),
            Some(addr("10.0.0.4:7473")),
            "unreachable ones do not count"
        );
        g.insert(addr("10.0.0.5:7473"), state(None, true));
        assert_eq!(active(&g).map(|x| x.0), Some(addr("10.0.0.4:7473")));
    }

    #[test]
    fn direct_on_link_vxlan_off_link_nothing_on_the_gateway_itself() {
        let addrs: Vec<IpNet> = vec![
            "192.168.1.7/24".parse().expect("n"),
            "10.244.3.1/24".parse().expect("n"),
            "127.0.0.1/8".parse().expect("n"),
        ];
        let local = Local {
            addresses: &addrs,
            encapsulation: Encapsulation::Auto,
            snat_v4: None,
            snat_v6: None,
        };
        let p = plan(addr("192.168.1.2:7473"), &ann(true, 1), local);
        assert_eq!(p.path, Path::Direct("192.168.1.2".parse().expect("ip")));
        assert_eq!(p.snat_v4, Some(Ipv4Addr::new(10, 244, 3, 1)));
        assert_eq!(p.snat_v6, None);
        let p = plan(addr("192.168.9.2:7473"), &ann(true, 1), local);
        assert_eq!(
            p.path,
            Path::Vxlan {
                remote: "192.168.9.2".parse().expect("ip"),
                vni: 7901,
                port: 4792
            }
        );
        let p = plan(addr("192.168.1.7:7473"), &ann(true, 1), local);
        assert_eq!(p.path, Path::Local);
        // route_via wins over the address the gateway was reached at.
        let mut a = ann(true, 1);
        a.route_via = Some("192.168.1.100".parse().expect("ip"));
        assert_eq!(
            plan(addr("192.168.9.2:7473"), &a, local).path,
            Path::Direct("192.168.1.100".parse().expect("ip"))
        );
        // Forced modes and an explicit source address.
        let forced = Local {
            encapsulation: Encapsulation::Vxlan,
            snat_v4: Some(Ipv4Addr::new(10, 244, 3, 9)),
            ..local
        };
        let p = plan(addr("192.168.1.2:7473"), &ann(true, 1), forced);
        assert!(matches!(p.path, Path::Vxlan { .. }));
        assert_eq!(p.snat_v4, Some(Ipv4Addr::new(10, 244, 3, 9)));
    }

    #[test]
    fn nft_script_snats_host_traffic_or_drops_it_and_checks_masquerade() {
        let addrs: Vec<IpNet> = vec!["10.244.3.1/24".parse().expect("n")];
        let local = Local {
            addresses: &addrs,
            encapsulation: Encapsulation::Auto,
            snat_v4: None,
            snat_v6: None,
        };
        let p = plan(addr("192.168.1.2:7473"), &ann(true, 1), local);
        let s = nft_script(&p);
        assert!(s.starts_with("table inet causeway_node {}\ndelete table inet causeway_node\n"));
        assert!(s.contains("elements = { 100.64.0.0/16 }"));
        assert!(s.contains("fib saddr type local ip daddr @views4 snat ip to 10.244.3.1"));
        assert!(!s.contains("ip daddr @views4 counter name host_dropped drop"));
        assert!(
            s.contains("ip6 daddr @views6 counter name host_dropped drop"),
            "no IPv6 source: dropped"
        );
        assert!(s.contains("ip daddr @views4 ip saddr != @pods4 counter name masqueraded"));
        let p = plan(
            addr("192.168.1.2:7473"),
            &ann(true, 1),
            Local {
                addresses: &[],
                ..local
            },
        );
        assert!(nft_script(&p).contains("ip daddr @views4 counter name host_dropped drop"));
    }
}
