//! A small full mesh through one rendezvous: every site peers with every
//! other by key only, behind a mix of NATs. Catches what only shows with
//! more than two sites (a peer update for one peer disturbing another, a
//! relay slot shared by two pairs, per-peer state mixed up); the scale
//! itself is measured by `causeway-bench mesh` (docs/performance.md).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use causeway_testbed::{Lab, LabSpec, Nat, SiteSpec};

use crate::common::*;

/// The sites: name, pod CIDR and NAT (none: on the internet).
const SITES: [(&str, &str, Option<Nat>); 6] = [
    ("pub0", "10.0.0.0/16", None),
    ("pub1", "10.1.0.0/16", None),
    ("cone0", "10.2.0.0/16", Some(Nat::PortPreserving)),
    ("cone1", "10.3.0.0/16", Some(Nat::PortPreserving)),
    ("sym0", "10.4.0.0/16", Some(Nat::Symmetric)),
    ("sym1", "10.5.0.0/16", Some(Nat::Symmetric)),
];

/// Whether docs/nat-traversal.md says the pair can be punched: a public
/// site with anything, two port-preserving (masquerade, EIM/APDF) NATs with
/// each other. A symmetric NAT (APDM/APDF) meets the other NATs on the relay.
fn punchable(a: Option<Nat>, b: Option<Nat>) -> bool {
    matches!(
        (a, b),
        (None, _) | (_, None) | (Some(Nat::PortPreserving), Some(Nat::PortPreserving))
    )
}

#[test]
fn six_site_mesh_behind_mixed_nats_reaches_every_pod_and_punches_where_it_can() {
    let lab = Lab::build(&LabSpec {
        sites: SITES
            .iter()
            .map(|(name, cidr, nat)| {
                let spec = SiteSpec::new(name, vec![cidr.parse().expect("cidr")]);
                match nat {
                    Some(nat) => spec.nat(*nat),
                    None => spec,
                }
            })
            .collect(),
    })
    .expect("lab");
    // IPv4 NATs only: the lab routes IPv6 to every gateway untranslated.
    for site in lab.sites().iter().filter(|s| s.nat_router.is_some()) {
        site.remove_ipv6_underlay().expect("flush IPv6");
    }
    let files: Vec<SiteFiles> = SITES.iter().map(|_| SiteFiles::new()).collect();
    let ip = IpAddr::V4(lab.internet_addr());
    let listed: Vec<(&str, &str)> = SITES
        .iter()
        .zip(&files)
        .map(|((name, _, _), f)| (*name, f.public_key.as_str()))
        .collect();
    let rendezvous = Rendezvous::start(lab.internet(), ip, &listed);
    let rdv = format!(
        "[[rendezvous]]\naddress = \"{}\"\npublic_key = {:?}\n",
        SocketAddr::new(ip, RENDEZVOUS_QUIC_PORT),
        rendezvous.public_key
    );
    let daemons: Vec<Daemon> = SITES
        .iter()
        .enumerate()
        .map(|(i, (name, cidr, _))| {
            let mut peers = String::new();
            for (k, (other, other_cidr, _)) in SITES.iter().enumerate().filter(|(k, _)| *k != i) {
                peers += &peer_toml(other, &files[k].public_key, &[other_cidr], None);
            }
            peers += &rdv;
            let config = files[i].write_config(name, &[cidr], &peers);
            Daemon::start(&lab.sites()[i].gateway, &files[i], &config)
        })
        .collect();
    let logs = || {
        let mut text = String::new();
        for ((name, _, _), d) in SITES.iter().zip(&daemons) {
            text += &format!("--- {name}:\n{}\n", d.log_text());
        }
        text + &format!("--- rendezvous:\n{}", rendezvous.log_text())
    };

    // Every ordered pair of pods, each source pinging its five peers in a
    // thread of its own.
    let started = Instant::now();
    let unreachable: Vec<String> = std::thread::scope(|s| {
        let threads: Vec<_> = lab
            .sites()
            .iter()
            .map(|from| {
                let lab = &lab;
                s.spawn(move || {
                    lab.sites()
                        .iter()
                        .filter(|to| to.name != from.name)
                        .filter_map(|to| {
                            let dst: Ipv4Addr = to.pods[0].addr;
                            ping_until(&from.pods[0].ns, dst.into(), Duration::from_secs(15))
                                .is_none()
                                .then(|| format!("{} -> {}", from.name, to.name))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|t| t.join().expect("ping thread"))
            .collect()
    });
    assert!(
        unreachable.is_empty(),
        "pods that never answered: {unreachable:?}\n{}",
        logs()
    );
    eprintln!(
        "all 30 ordered pairs answered after {:?}",
        started.elapsed()
    );

    // Every pair that can be punched ends direct on both sides; every
    // other pair is relayed (and still answered above).
    let path = |i: usize, k: usize| -> String {
        daemons[i]
            .status()
            .peers
            .into_iter()
            .find(|p| p.name == SITES[k].0)
            .expect("peer in status")
            .path
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let wrong: Vec<String> = (0..SITES.len())
            .flat_map(|i| {
                (0..SITES.len())
                    .filter(move |&k| k != i)
                    .map(move |k| (i, k))
            })
            .filter_map(|(i, k)| {
                let want = if punchable(SITES[i].2, SITES[k].2) {
                    "direct"
                } else {
                    "relay"
                };
                let got = path(i, k);
                (got != want)
                    .then(|| format!("{} sees {} on {got}, not {want}", SITES[i].0, SITES[k].0))
            })
            .collect();
        if wrong.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "paths after 15 s: {wrong:#?}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("paths as expected after {:?}", started.elapsed());
    // The relay pairs (sym0/sym1 with each other and with cone0/cone1)
    // still carry traffic now that everything has settled.
    for (from, to) in [(4, 5), (5, 2), (3, 4)] {
        assert_ping(
            &lab.sites()[from].pods[0].ns,
            lab.sites()[to].pods[0].addr.into(),
        );
    }
    for d in daemons {
        d.stop();
    }
}
