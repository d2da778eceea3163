//! NAT traversal in a simulated network: both sites run the site core the
//! daemon ships (`causeway::core::Site`: path machines, STUN client,
//! candidate publishing, relay fallback, WireGuard handshakes), the
//! rendezvous runs the server's real `Registry`, every packet is real
//! bytes, and RFC 4787 NATs sit in between (nat_matrix/nat.rs). Virtual
//! clock: the whole file runs in milliseconds.
//!
//! The rule for which pairings can go direct is `direct_possible` below; the
//! reasoning is in docs/nat-traversal.md. The simulator judges it: the matrix
//! test fails on any pairing where the state machines do better or worse.

#[path = "nat_matrix/nat.rs"]
mod nat;
#[path = "nat_matrix/world.rs"]
mod world;

use std::fmt::Write as _;
use std::time::Duration;

use causeway_nat::path::Path;
use nat::{Filtering, Mapping};
use world::{SimConfig, SiteNat, World};

const EIM: Mapping = Mapping::EndpointIndependent;
const ADM: Mapping = Mapping::AddressDependent;
const APDM: Mapping = Mapping::AddressAndPortDependent;
const EIF: Filtering = Filtering::EndpointIndependent;
const ADF: Filtering = Filtering::AddressDependent;
const APDF: Filtering = Filtering::AddressAndPortDependent;

fn behaviour(site: SiteNat) -> (Mapping, Filtering) {
    match site {
        // No NAT, no firewall: one address for everyone, open to everyone.
        SiteNat::Public => (EIM, EIF),
        SiteNat::Nat(m, f) => (m, f),
    }
}

/// Whether a ping from `x` to `y`'s server-reflexive address gets in, and
/// `y`'s answer gets back to `x`.
fn reaches(x: SiteNat, y: SiteNat) -> bool {
    let (xm, xf) = behaviour(x);
    let (ym, yf) = behaviour(y);
    // x's ping arrives at y's STUN mapping. It passes y's filter if y filters
    // nothing, or if y's pings toward x left from that same mapping (y maps
    // endpoint-independently) and opened it for x's address (ADF) or for x's
    // exact endpoint, which x's ping comes from only if x maps
    // endpoint-independently too (APDF).
    let gets_in = yf == EIF || (ym == EIM && (yf == ADF || xm == EIM));
    // y answers from its mapping toward x's source. x's mapping sent to y's
    // server-reflexive address only, so the answer passes unless x filters
    // by port and y's answer leaves from another port (y maps per
    // destination).
    let gets_back = xf != APDF || ym == EIM;
    gets_in && gets_back
}

/// A direct path forms iff a probe exchange works in at least one direction
/// (the other direction then follows: each side learns the other's
/// peer-reflexive address).
fn direct_possible(a: SiteNat, b: SiteNat) -> bool {
    reaches(a, b) || reaches(b, a)
}

/// Whether site `i`'s direct path (if any) points at a live address of the
/// other site: its public address, or a port its NAT has bound right now.
fn direct_is_live(w: &World, i: usize) -> bool {
    let Path::Direct(addr) = w.path(i) else {
        return false;
    };
    let peer = &w.sites[1 - i];
    match &peer.nat {
        None => addr == peer.host,
        Some(nat) => addr.ip() == nat.external_ip && nat.ports().contains(&addr.port()),
    }
}

fn both_direct(w: &World) -> bool {
    direct_is_live(w, 0) && direct_is_live(w, 1)
}

fn relays(w: &World, i: usize) -> usize {
    w.sites[i]
        .path_log
        .iter()
        .filter(|(_, p)| *p == Path::Relay)
        .count()
}

/// Runs every pairing in `cfg` for 30 s of virtual time; returns the
/// mismatches against the rule and a printable table.
fn run_matrix(cfg: SimConfig, strict: bool) -> (Vec<String>, String, usize) {
    let all = SiteNat::all();
    let mut mismatches = Vec::new();
    let mut table = format!("{:>10} |", "A \\ B");
    for b in &all {
        let _ = write!(table, "{:>10}", b.label());
    }
    table.push('\n');
    let mut direct = 0;
    for &a in &all {
        let _ = write!(table, "{:>10} |", a.label());
        for &b in &all {
            let mut w = World::new(a, b, cfg);
            w.run_for(Duration::from_secs(30));
            let expected = direct_possible(a, b);
            let cell = if both_direct(&w) {
                direct += 1;
                let formed = (0..2)
                    .map(|i| w.sites[i].path_log.first().map_or(Duration::MAX, |e| e.0))
                    .max();
                let formed = formed.unwrap_or(Duration::MAX);
                if !expected {
                    mismatches.push(format!(
                        "{} x {}: direct, rule says relay",
                        a.label(),
                        b.label()
                    ));
                }
                // Direct from the first pong on, never back to the relay.
                if strict
                    && (relays(&w, 0) > 0 || relays(&w, 1) > 0 || formed > Duration::from_secs(2))
                {
                    mismatches.push(format!(
                        "{} x {}: unsteady direct path: {:?} / {:?}",
                        a.label(),
                        b.label(),
                        w.sites[0].path_log,
                        w.sites[1].path_log
                    ));
                }
                format!("D {:>4}ms", formed.as_millis())
            } else {
                let state = (w.path(0), w.path(1));
                if expected || state != (Path::Relay, Path::Relay) {
                    mismatches.push(format!(
                        "{} x {}: {:?}, rule says {}",
                        a.label(),
                        b.label(),
                        state,
                        if expected { "direct" } else { "relay" }
                    ));
                }
                if strict && (!w.sites[0].path_log.is_empty() || !w.sites[1].path_log.is_empty()) {
                    mismatches.push(format!(
                        "{} x {}: relay pairing changed path",
                        a.label(),
                        b.label()
                    ));
                }
                "relay".to_owned()
            };
            let _ = write!(table, "{cell:>10}");
        }
        table.push('\n');
    }
    (mismatches, table, direct)
}

#[test]
fn nat_matrix_direct_exactly_where_possible() {
    let (mismatches, table, direct) = run_matrix(SimConfig::default(), true);
    println!("{table}\n{direct} of 100 pairings direct");
    assert!(mismatches.is_empty(), "{}\n{table}", mismatches.join("\n"));
    // The rule itself, counted: see docs/nat-traversal.md.
    let all = SiteNat::all();
    let expected = all
        .iter()
        .flat_map(|&a| all.iter().map(move |&b| (a, b)))
        .filter(|&(a, b)| direct_possible(a, b))
        .count();
    assert_eq!((direct, expected), (64, 64));
}

#[test]
fn nat_matrix_with_packet_loss() {
    // 10 % loss on every internet packet: same outcome, transient relay
    // episodes allowed.
    for seed in [2, 3] {
        let cfg = SimConfig {
            loss: 0.10,
            seed,
            ..SimConfig::default()
        };
        let (mismatches, table, _) = run_matrix(cfg, false);
        assert!(
            mismatches.is_empty(),
            "seed {seed}:\n{}\n{table}",
            mismatches.join("\n")
        );
    }
}

fn established(a: SiteNat, b: SiteNat, cfg: SimConfig) -> World {
    let mut w = World::new(a, b, cfg);
    assert!(
        w.run_until(Duration::from_secs(5), both_direct),
        "{} x {}: no direct path",
        a.label(),
        b.label()
    );
    w
}

/// Pairings that go direct, covering each NAT behaviour at least once.
fn direct_pairings() -> Vec<(SiteNat, SiteNat)> {
    vec![
        (SiteNat::Nat(EIM, APDF), SiteNat::Nat(EIM, APDF)),
        (SiteNat::Nat(EIM, ADF), SiteNat::Nat(APDM, APDF)),
        (SiteNat::Nat(ADM, EIF), SiteNat::Nat(ADM, ADF)),
        (SiteNat::Nat(APDM, EIF), SiteNat::Nat(APDM, EIF)),
        (SiteNat::Public, SiteNat::Nat(APDM, APDF)),
    ]
}

#[test]
fn idle_longer_than_nat_timeout_survives_with_keepalives() {
    let all = SiteNat::all();
    let pairings = all.iter().flat_map(|&a| all.iter().map(move |&b| (a, b)));
    for (a, b) in pairings.filter(|&(a, b)| direct_possible(a, b)) {
        // No STUN refresh: only the path probes keep the NAT mappings.
        let cfg = SimConfig {
            stun_interval: None,
            ..SimConfig::default()
        };
        let mut w = established(a, b, cfg);
        w.run_for(Duration::from_secs(60));
        let settled = [w.sites[0].probes_sent, w.sites[1].probes_sent];
        w.run_for(Duration::from_secs(240));
        for (i, settled) in settled.into_iter().enumerate() {
            assert!(direct_is_live(&w, i), "{} x {}", a.label(), b.label());
            // Never back to the relay. The choice between direct addresses
            // may move (toward an address the peer sends from, once a mapping
            // that only STUN would refresh is about to go), then settles.
            let log = &w.sites[i].path_log;
            assert!(
                log.iter().all(|(_, p)| *p != Path::Relay) && log.len() <= 3,
                "{} x {}: {log:?}",
                a.label(),
                b.label()
            );
            // Steady state is cheap: keepalives for the working addresses,
            // pongs for the peer's, an upgrade ping now and then (about
            // 30 a minute; up to ~55 when both NATs map per destination).
            let per_minute = (w.sites[i].probes_sent - settled) as f64 / 4.0;
            assert!(
                per_minute < 60.0,
                "{} x {}: {per_minute} probes per minute",
                a.label(),
                b.label()
            );
        }
    }
}

#[test]
fn keepalives_slower_than_nat_timeout_lose_the_path_and_recover() {
    for (a, b) in direct_pairings() {
        // Probes every 90 s and nothing else: the 30 s NAT mappings expire
        // between them.
        let mut cfg = SimConfig {
            stun_interval: None,
            ..SimConfig::default()
        };
        cfg.path.keepalive_interval = Duration::from_secs(90);
        cfg.path.upgrade_interval = Duration::from_secs(600);
        let mut w = established(a, b, cfg);
        w.run_for(Duration::from_secs(240));
        let nat_sites: Vec<usize> = (0..2).filter(|&i| w.sites[i].nat.is_some()).collect();
        for i in 0..2 {
            assert!(
                direct_is_live(&w, i),
                "{} x {}: site {i} {:?}",
                a.label(),
                b.label(),
                w.sites[i].path_log
            );
        }
        // Some site noticed the dead mapping (after the NAT timeout) and came
        // back within seconds.
        let noticed: Vec<usize> = (0..2).filter(|&i| relays(&w, i) > 0).collect();
        assert!(
            !noticed.is_empty() && !nat_sites.is_empty(),
            "{} x {}: loss went unnoticed",
            a.label(),
            b.label()
        );
        for i in noticed {
            let log = &w.sites[i].path_log;
            for (k, (at, path)) in log.iter().enumerate() {
                if *path == Path::Relay {
                    assert!(*at > Duration::from_secs(30));
                    // Direct again once the peer, too, has noticed (when it
                    // gets our new candidates it checks its path at once:
                    // five unanswered pings, one a second) and both sites
                    // have sent fresh candidates through the rendezvous.
                    let back = log.get(k + 1).expect("direct again");
                    assert!(
                        back.0 - *at < Duration::from_secs(8),
                        "{} x {}: {log:?}",
                        a.label(),
                        b.label()
                    );
                }
            }
        }
    }
}

#[test]
fn rebinding_is_detected_and_the_path_reestablished() {
    // Every pairing that goes direct, rebinding each NAT in turn mid-session.
    let all = SiteNat::all();
    let mut checked = 0;
    for &a in &all {
        for &b in &all {
            if !direct_possible(a, b) {
                continue;
            }
            for rebound in 0..2 {
                let mut w = established(a, b, SimConfig::default());
                w.run_for(Duration::from_secs(20));
                let Some(nat) = w.sites[rebound].nat.as_mut() else {
                    continue;
                };
                let old_ports = nat.ports();
                nat.rebind();
                let rebind_at = w.elapsed();
                // The old path is dead now: nothing may still point at it
                // once recovered.
                let recovered = w.run_until(Duration::from_secs(30), |w| {
                    both_direct(w)
                        && w.sites[rebound]
                            .nat
                            .as_ref()
                            .is_some_and(|n| n.ports().iter().all(|p| !old_ports.contains(p)))
                });
                assert!(
                    recovered,
                    "{} x {}, NAT {rebound} rebound: {:?} / {:?}",
                    a.label(),
                    b.label(),
                    w.path(0),
                    w.path(1)
                );
                let took = w.elapsed() - rebind_at;
                // Detection: at most a keepalive interval plus the missed
                // pings; recovery: a STUN round trip, the rendezvous, a burst.
                assert!(
                    took < Duration::from_secs(15),
                    "{} x {}: recovered after {took:?}",
                    a.label(),
                    b.label()
                );
                // And it stays up.
                w.run_for(Duration::from_secs(60));
                assert!(
                    both_direct(&w),
                    "{} x {} after rebinding",
                    a.label(),
                    b.label()
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 80, "{checked}");
}

/// The longest time between two echo replies at site 0 while it sends a
/// request every 20 ms for `d`, with `event` applied after `at`.
fn longest_gap(
    w: &mut World,
    d: Duration,
    at: Duration,
    event: impl FnOnce(&mut World),
) -> Duration {
    let tick = Duration::from_millis(20);
    let start = w.elapsed();
    let mut event = Some(event);
    while w.elapsed() < start + d {
        if w.elapsed() >= start + at
            && let Some(event) = event.take()
        {
            event(w);
        }
        w.send_request(0);
        w.run_for(tick);
    }
    let replies: Vec<Duration> = w.sites[0]
        .replies
        .iter()
        .copied()
        .filter(|t| *t >= start)
        .collect();
    let mut longest = replies.first().map_or(d, |t| *t - start);
    for pair in replies.windows(2) {
        longest = longest.max(pair[1] - pair[0]);
    }
    longest.max(start + d - replies.last().copied().unwrap_or(start))
}

#[test]
fn rebinding_while_traffic_flows_heals_within_3_seconds() {
    // Every pairing that goes direct, each NAT rebound in turn, while site 0
    // sends a request every 20 ms and site 1 answers each: the longest time
    // without an answer, rebinding included.
    let all = SiteNat::all();
    let mut worst = (Duration::ZERO, String::new());
    let mut failures = Vec::new();
    for &a in &all {
        for &b in &all {
            if !direct_possible(a, b) {
                continue;
            }
            for rebound in 0..2 {
                let mut w = established(a, b, SimConfig::default());
                if w.sites[rebound].nat.is_none() {
                    continue;
                }
                w.run_for(Duration::from_secs(3));
                let gap = longest_gap(
                    &mut w,
                    Duration::from_secs(20),
                    Duration::from_secs(5),
                    |w| {
                        if let Some(nat) = w.sites[rebound].nat.as_mut() {
                            nat.rebind();
                        }
                    },
                );
                let label = format!("{} x {}, NAT {rebound} rebound", a.label(), b.label());
                if gap >= Duration::from_secs(3) {
                    failures.push(format!(
                        "{label}: {gap:?} {:?} / {:?}",
                        w.sites[0].path_log, w.sites[1].path_log
                    ));
                }
                if gap > worst.0 {
                    worst = (gap, label);
                }
            }
        }
    }
    println!("longest gap: {:?} ({})", worst.0, worst.1);
    assert!(
        failures.is_empty(),
        "{} pairings:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn relay_pairings_probe_at_a_low_rate() {
    let mut w = World::new(
        SiteNat::Nat(APDM, APDF),
        SiteNat::Nat(APDM, APDF),
        SimConfig::default(),
    );
    w.run_for(Duration::from_secs(10));
    let after_burst = [w.sites[0].probes_sent, w.sites[1].probes_sent];
    w.run_for(Duration::from_secs(600));
    for (i, after_burst) in after_burst.into_iter().enumerate() {
        assert_eq!(w.path(i), Path::Relay);
        let per_minute = (w.sites[i].probes_sent - after_burst) as f64 / 10.0;
        // Two candidates (host, server-reflexive), one ping each every 8-10 s.
        assert!(per_minute <= 16.0, "{per_minute} probes per minute");
    }
}

#[test]
fn late_peer_still_gets_a_direct_path() {
    // Site B comes up 45 s after A (A's discovery burst is long over, and the
    // NAT mapping A opened toward B's old address has expired).
    for (a, b) in direct_pairings() {
        let cfg = SimConfig {
            b_start: Duration::from_secs(45),
            ..SimConfig::default()
        };
        let mut w = World::new(a, b, cfg);
        w.run_for(Duration::from_secs(44));
        assert!(
            w.run_until(Duration::from_secs(10), both_direct),
            "{} x {}",
            a.label(),
            b.label()
        );
    }
}
