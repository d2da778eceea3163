//! Overlapping pod CIDRs: each site sees its peers through view CIDRs and
//! translates in the data path; the per-peer allow-list; dual stack.

use std::net::{IpAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use causeway_testbed::IpNet;

use crate::common::*;

const SAME: &[&str] = &["10.0.0.0/16", "fd00:10::/64"];

/// The view site `viewer`'s daemon gives peer `peer`'s real CIDR `real`.
fn view(mesh: &Mesh, viewer: usize, peer: &str, real: &str) -> IpNet {
    let status = mesh.daemon(viewer).status();
    let p = status
        .peers
        .iter()
        .find(|p| p.name == peer)
        .expect("peer in status");
    let v = p
        .views
        .iter()
        .find(|v| v.real == real)
        .unwrap_or_else(|| panic!("no view of {real}: {p:?}"));
    v.view.parse().expect("view cidr")
}

/// `addr` (inside `real`) as seen through `view`.
fn through(addr: impl Into<IpAddr>, real: &str, view: IpNet) -> IpAddr {
    let real: IpNet = real.parse().expect("cidr");
    match (addr.into(), real, view) {
        (IpAddr::V4(a), IpNet::V4(r), IpNet::V4(v)) => {
            let host = u32::from(a) & !u32::from(r.netmask());
            IpAddr::V4((u32::from(v.network()) | host).into())
        }
        (IpAddr::V6(a), IpNet::V6(r), IpNet::V6(v)) => {
            let host = u128::from(a) & !u128::from(r.netmask());
            IpAddr::V6((u128::from(v.network()) | host).into())
        }
        _ => panic!("family mismatch"),
    }
}

fn drops(mesh: &Mesh, site: usize, peer: &str) -> u64 {
    let status = mesh.daemon(site).status();
    let p = status.peers.iter().find(|p| p.name == peer).expect("peer");
    p.drops
        .iter()
        .filter(|(k, _)| k.starts_with("policy_") || *k == "not_exported")
        .map(|(_, v)| v)
        .sum()
}

#[test]
fn two_sites_with_the_same_pod_cidrs_reach_each_other_v4_and_v6() {
    let mesh = Mesh::build(&[SiteDef::new("a", SAME), SiteDef::new("b", SAME)], false);
    let (pa, pb) = (&mesh.site(0).pods[0], &mesh.site(1).pods[0]);
    let (a6, b6) = (pa.addr6.expect("v6 pod"), pb.addr6.expect("v6 pod"));
    let b_in_a4 = view(&mesh, 0, "b", "10.0.0.0/16");
    let b_in_a6 = view(&mesh, 0, "b", "fd00:10::/64");
    let a_in_b4 = view(&mesh, 1, "a", "10.0.0.0/16");
    let a_in_b6 = view(&mesh, 1, "a", "fd00:10::/64");
    assert_ne!(b_in_a4.to_string(), "10.0.0.0/16", "overlap not remapped");
    assert_eq!(b_in_a4.prefix_len(), 16);
    assert_eq!(b_in_a6.prefix_len(), 64);

    let pb4 = through(pb.addr, "10.0.0.0/16", b_in_a4);
    let pa4 = through(pa.addr, "10.0.0.0/16", a_in_b4);
    let pb6 = through(b6, "fd00:10::/64", b_in_a6);
    let pa6 = through(a6, "fd00:10::/64", a_in_b6);
    for (from, to) in [(&pa.ns, pb4), (&pb.ns, pa4), (&pa.ns, pb6), (&pb.ns, pa6)] {
        assert_ping(from, to);
    }

    // 64 MiB each way over each family; pods have MTU 1500 and the tunnel
    // 1420, so this also proves MSS clamping / PMTU leave no black hole.
    tcp_transfer_via(&pb.ns, pb.addr.into(), &pa.ns, pb4, 64 << 20);
    tcp_transfer_via(&pa.ns, pa.addr.into(), &pb.ns, pa4, 64 << 20);
    tcp_transfer_via(&pb.ns, b6.into(), &pa.ns, pb6, 64 << 20);
    tcp_transfer_via(&pa.ns, a6.into(), &pb.ns, pa6, 64 << 20);
    udp_exchange_via(&pb.ns, pb.addr.into(), &pa.ns, pb4, 400, 1300, 95);
    udp_exchange_via(&pa.ns, a6.into(), &pb.ns, pa6, 400, 1300, 95);

    // Bulk UDP bigger than the tunnel MTU: the first datagrams are answered
    // with "fragmentation needed" / "packet too big", the rest arrive.
    udp_exchange_via(&pb.ns, pb.addr.into(), &pa.ns, pb4, 300, 1472, 90);
    udp_exchange_via(&pb.ns, b6.into(), &pa.ns, pb6, 300, 1452, 90);

    // The remote pod sees us at our view in its site, not at our real address.
    let listener = pb
        .ns
        .enter(|| TcpListener::bind((pb.addr, 5003)).expect("bind"));
    let _conn = pa.ns.enter(|| {
        TcpStream::connect_timeout(&(pb4, 5003).into(), Duration::from_secs(5)).expect("connect")
    });
    let (_, seen_from) = listener.accept().expect("accept");
    assert_eq!(seen_from.ip(), pa4, "b should see a's pod at its view");
    assert_eq!(mesh.lab.leaked_packets().expect("leaks"), 0);
}

#[test]
fn ipv6_underlay_carries_the_tunnel() {
    let mesh = Mesh::build(
        &[
            SiteDef::new("a", &["10.0.0.0/16"]),
            SiteDef::new("b", &["10.1.0.0/16"]),
        ],
        true,
    );
    let (pa, pb) = (&mesh.site(0).pods[0], &mesh.site(1).pods[0]);
    assert_ping(&pa.ns, pb.addr.into());
    tcp_transfer(&pb.ns, pb.addr, &pa.ns, 16 << 20);
    let status = mesh.daemon(0).status();
    let endpoint = status.peers[0].endpoint.clone().expect("endpoint");
    assert!(
        endpoint.starts_with('['),
        "endpoint should be IPv6: {endpoint}"
    );
}

#[test]
fn three_sites_with_the_same_pod_cidr_each_reach_both_others() {
    let cidr: &[&str] = &["10.0.0.0/16"];
    let mesh = Mesh::build(
        &[
            SiteDef::new("a", cidr),
            SiteDef::new("b", cidr),
            SiteDef::new("c", cidr),
        ],
        false,
    );
    let names = ["a", "b", "c"];
    for i in 0..3 {
        let mut seen = Vec::new();
        for k in (0..3).filter(|k| *k != i) {
            let v = view(&mesh, i, names[k], "10.0.0.0/16");
            assert!(
                !seen.contains(&v),
                "site {} gave two peers the same view {v}",
                names[i]
            );
            seen.push(v);
            let to = through(mesh.site(k).pods[0].addr, "10.0.0.0/16", v);
            assert_ping(&mesh.site(i).pods[0].ns, to);
        }
    }
}

#[test]
fn the_allow_list_lets_in_only_what_it_names() {
    // b lets a reach only TCP 443 on its pod subnet; a allows everything.
    let rules = "[[peer.allow]]\ncidr = \"10.1.1.0/24\"\nproto = \"tcp\"\nports = \"443\"\n";
    let mesh = Mesh::build(
        &[
            SiteDef::new("a", &["10.0.0.0/16"]),
            SiteDef {
                allow: &[("a", rules)],
                ..SiteDef::new("b", &["10.1.0.0/16"])
            },
        ],
        false,
    );
    let (pa, pb) = (&mesh.site(0).pods[0], &mesh.site(1).pods[0]);
    // b's own pod opens flows to a: the replies come back (stateless rule).
    assert_ping(&pb.ns, pa.addr.into());
    tcp_transfer(&pa.ns, pa.addr, &pb.ns, 1 << 20);
    let before = drops(&mesh, 1, "a");

    // a → b: TCP 443 works.
    let allowed = pb
        .ns
        .enter(|| TcpListener::bind((pb.addr, 443)).expect("bind 443"));
    let _denied_listener = pb
        .ns
        .enter(|| TcpListener::bind((pb.addr, 8080)).expect("bind 8080"));
    let conn = pa
        .ns
        .enter(|| TcpStream::connect_timeout(&(pb.addr, 443).into(), Duration::from_secs(5)));
    assert!(conn.is_ok(), "TCP 443 should be allowed: {conn:?}");
    allowed.accept().expect("accept 443");
    // TCP 8080, UDP and ping are not.
    let conn = pa
        .ns
        .enter(|| TcpStream::connect_timeout(&(pb.addr, 8080).into(), Duration::from_secs(2)));
    assert!(conn.is_err(), "TCP 8080 should be denied");
    let rx = pb
        .ns
        .enter(|| UdpSocket::bind((pb.addr, 5353)).expect("bind"));
    rx.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let tx = pa.ns.enter(|| UdpSocket::bind("0.0.0.0:0").expect("bind"));
    for _ in 0..3 {
        tx.send_to(b"denied", (pb.addr, 5353)).expect("send");
    }
    assert!(rx.recv(&mut [0u8; 64]).is_err(), "UDP should be denied");
    assert!(
        pa.ns
            .ping(pb.addr.into(), Duration::from_millis(500))
            .expect("ping")
            .is_none(),
        "ping should be denied"
    );

    let denied = drops(&mesh, 1, "a") - before;
    assert!(denied >= 5, "denied packets not counted: {denied}");
}

#[test]
fn views_survive_a_restart() {
    let cidr: &[&str] = &["10.0.0.0/16", "fd00:10::/64"];
    let mut mesh = Mesh::build(&[SiteDef::new("a", cidr), SiteDef::new("b", cidr)], false);
    let before = mesh.daemon(0).status().peers[0].views.clone();
    mesh.restart(0);
    let after = mesh.daemon(0).status().peers[0].views.clone();
    assert_eq!(before, after);
    let to = through(
        mesh.site(1).pods[0].addr,
        "10.0.0.0/16",
        view(&mesh, 0, "b", "10.0.0.0/16"),
    );
    assert_ping(&mesh.site(0).pods[0].ns, to);
}
