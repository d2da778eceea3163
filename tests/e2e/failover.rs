//! Standby gateways on bare metal: two replicas of site a's gateway (the
//! same key) on two nodes of a cluster site, keepalived (VRRP, for real)
//! choosing the active one and telling it with `causeway ctl role`. A pod
//! on a third node sends 256 MiB to site b and pings it every 20 ms while
//! the active replica is killed (`kill -9`) or its node unplugged; the
//! standby takes over, the transfer completes intact, and the longest gap
//! in the ping train is reported and bounded. Then the old replica comes
//! back (fail-back) without a second outage. Both with NATs and a
//! rendezvous, and with static endpoints (a port forward to the VIP).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use causeway_testbed::{ClusterSpec, Keepalived, Lab, LabSpec, Nat, Netns, SiteSpec};

use crate::common::*;

/// The node of site a whose pod sends: not a gateway.
const CLIENT_NODE: usize = 2;
/// The bytes sent across the failover.
const TRANSFER: usize = 256 << 20;
/// When the failure is caused: after this much has arrived.
const FAIL_AFTER: usize = 32 << 20;
/// The longest gap in the ping train the issue allows.
const MAX_GAP: Duration = Duration::from_secs(3);

/// How the active replica is taken out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// `kill -9` of its daemon (keepalived sees the TUN lose its carrier).
    Kill9,
    /// Its node's link to the node LAN is cut (keepalived on the other
    /// node misses the advertisements).
    LinkCut,
}

/// How the sites find each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Paths {
    /// Both sites behind NATs, introduced by a rendezvous.
    Rendezvous,
    /// b has a public address; a's NAT router forwards its WireGuard port
    /// to the VIP, and each site has the other's static endpoint.
    Static,
}

/// One replica of site a's gateway: its files, daemon and keepalived.
struct Replica {
    node: usize,
    files: SiteFiles,
    config: PathBuf,
    daemon: Option<Daemon>,
    keepalived: Option<Keepalived>,
}

struct FailoverLab {
    lab: Lab,
    /// The node agent on the client's node.
    agent: NodeAgent,
    /// Keeps the cluster secret and the node agent's files.
    _key_a: SiteFiles,
    _rendezvous: Option<Rendezvous>,
    replicas: Vec<Replica>,
    _files_b: SiteFiles,
    daemon_b: Daemon,
    /// Where site a's pods reach b's first pod.
    b_pod_view: Ipv4Addr,
}

impl FailoverLab {
    fn new(paths: Paths) -> FailoverLab {
        const PORT_A: u16 = PORT;
        let cidr = "10.0.0.0/16";
        let a = SiteSpec::new("a", vec![cidr.parse().expect("cidr")])
            .nat(Nat::PortPreserving)
            .cluster(match paths {
                Paths::Rendezvous => ClusterSpec::new(3, 2),
                Paths::Static => ClusterSpec::new(3, 2).port_forward(PORT_A),
            });
        let b = SiteSpec::new("b", vec![cidr.parse().expect("cidr")]);
        let b = match paths {
            Paths::Rendezvous => b.nat(Nat::PortPreserving),
            Paths::Static => b,
        };
        let lab = Lab::build(&LabSpec { sites: vec![a, b] }).expect("lab");
        lab.site("b").remove_ipv6_underlay().expect("flush IPv6");
        let files_b = SiteFiles::new();
        let key_a = SiteFiles::new();
        let rendezvous = (paths == Paths::Rendezvous).then(|| {
            Rendezvous::start(
                lab.internet(),
                IpAddr::V4(lab.internet_addr()),
                &[("a", &key_a.public_key), ("b", &files_b.public_key)],
            )
        });
        let rdv = rendezvous
            .as_ref()
            .map(|r| {
                format!(
                    "[[rendezvous]]\naddress = \"{}:{RENDEZVOUS_QUIC_PORT}\"\npublic_key = {:?}\n\n",
                    lab.internet_addr(),
                    r.public_key
                )
            })
            .unwrap_or_default();
        let (endpoint_of_a, endpoint_of_b) = match paths {
            Paths::Rendezvous => (None, None),
            Paths::Static => (
                Some(SocketAddr::new(lab.site("a").public_addr, PORT_A)),
                Some(SocketAddr::new(lab.site("b").public_addr, PORT)),
            ),
        };
        // Both replicas: the same key and config, their own sockets and
        // state; node agents route the views to the VIP.
        let vip = lab.site("a").cluster.as_ref().expect("cluster").vip;
        let secret = key_a.path("cluster.secret");
        std::fs::write(&secret, "the cluster secret of this failover test\n").expect("secret");
        let peers_a = peer_toml("b", &files_b.public_key, &[cidr], endpoint_of_b)
            + &rdv
            + "[failover]\nelection = \"keepalived\"\n\n"
            + &format!(
                "[cluster]\nlisten = \"0.0.0.0:{CLUSTER_PORT}\"\nsecret_file = {secret:?}\nroute_via = \"{vip}\"\n"
            );
        let replicas: Vec<Replica> = (0..2)
            .map(|node| {
                let files = key_a.clone_key();
                let config = files.write_config("a", &[cidr], &peers_a);
                Replica {
                    node,
                    files,
                    config,
                    daemon: None,
                    keepalived: None,
                }
            })
            .collect();
        let config_b = files_b.write_config(
            "b",
            &[cidr],
            &(peer_toml("a", &key_a.public_key, &[cidr], endpoint_of_a) + &rdv),
        );
        let daemon_b = Daemon::start(&lab.site("b").gateway, &files_b, &config_b);
        let cluster = lab.site("a").cluster.as_ref().expect("cluster");
        let gateways = [cluster.node(0).addr, cluster.node(1).addr];
        let agent = NodeAgent::start(
            cluster.node_ns(CLIENT_NODE),
            key_a.dir.path(),
            "node-agent",
            &gateways,
            &secret,
        );
        let mut lab = FailoverLab {
            lab,
            agent,
            _key_a: key_a,
            _rendezvous: rendezvous,
            replicas,
            _files_b: files_b,
            daemon_b,
            b_pod_view: Ipv4Addr::UNSPECIFIED,
        };
        for i in 0..2 {
            lab.start_replica(i);
        }
        // Where a's pods find b: the view the (first) replica gave it.
        let status = lab.replicas[0].daemon.as_ref().expect("daemon").status();
        lab.b_pod_view = view_of(&status, lab.lab.site("b").pods[0].addr);
        // The client's node routes b's view to the VIP: the node agent's
        // doing (no hand-made route).
        let view_net = status.peers[0].views[0].view.clone();
        let cluster = lab.lab.site("a").cluster.as_ref().expect("cluster");
        let ns = cluster.node_ns(CLIENT_NODE);
        let t = Instant::now();
        loop {
            let routes = ns.ip(&["route", "show", "proto", "202"]).expect("routes");
            if routes.contains(&format!("{view_net} via {vip}")) {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "no node route to {view_net} via {vip}: {routes}\n{}",
                lab.agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        lab
    }

    /// Starts replica `i`'s daemon (standby until keepalived says
    /// otherwise), then its keepalived.
    fn start_replica(&mut self, i: usize) {
        let cluster = self.lab.site("a").cluster.as_ref().expect("cluster");
        let r = &mut self.replicas[i];
        let ns = cluster.node_ns(r.node);
        let daemon = Daemon::start(ns, &r.files, &r.config);
        assert_eq!(daemon.status().role, causeway::core::Role::Standby);
        r.daemon = Some(daemon);
        if r.keepalived.is_none() {
            let dir = r.files.path("keepalived");
            std::fs::create_dir_all(&dir).expect("keepalived dir");
            let config = causeway_testbed::shipped_config(
                if i == 0 { 150 } else { 100 },
                &format!("{}/{}", cluster.vip, cluster.lan_prefix.prefix_len()),
                std::path::Path::new(causeway_bin()),
                &r.files.socket(),
            )
            .expect("the shipped keepalived config");
            r.keepalived = Some(Keepalived::start_config(ns, &dir, &config).expect("keepalived"));
        }
    }

    /// The replicas that say they are active.
    fn actives(&self) -> Vec<usize> {
        active_replicas(self.replicas.iter().map(|r| r.daemon.as_ref()))
    }

    /// Waits until exactly one replica is active; returns it.
    fn wait_one_active(&self, within: Duration) -> usize {
        wait_one_active(|| self.actives(), within, || self.logs())
    }

    fn client(&self) -> &Netns {
        let cluster = self.lab.site("a").cluster.as_ref().expect("cluster");
        &cluster.node(CLIENT_NODE).pods[0].ns
    }

    fn server(&self) -> (&Netns, Ipv4Addr) {
        let pod = &self.lab.site("b").pods[0];
        (&pod.ns, pod.addr)
    }

    fn logs(&self) -> String {
        let mut text = String::new();
        for (i, r) in self.replicas.iter().enumerate() {
            if let Some(d) = &r.daemon {
                text += &format!("--- replica {i}:\n{}", d.log_text());
            }
            if let Some(k) = &r.keepalived {
                text += &format!("--- keepalived {i}:\n{}", k.log_text());
            }
        }
        text + &format!("--- b:\n{}", self.daemon_b.log_text())
    }

    /// Takes replica `i` out.
    fn fail(&mut self, i: usize, failure: Failure) {
        match failure {
            Failure::Kill9 => {
                let mut daemon = self.replicas[i].daemon.take().expect("running");
                daemon.child.kill9().expect("kill -9");
            }
            Failure::LinkCut => {
                let cluster = self.lab.site("a").cluster.as_ref().expect("cluster");
                cluster.cut_node_links(self.replicas[i].node).expect("cut");
            }
        }
    }

    /// Brings replica `i` back.
    fn recover(&mut self, i: usize, failure: Failure) {
        match failure {
            Failure::Kill9 => self.start_replica(i),
            Failure::LinkCut => {
                let cluster = self.lab.site("a").cluster.as_ref().expect("cluster");
                cluster
                    .restore_node_links(self.replicas[i].node)
                    .expect("restore");
            }
        }
    }
}

fn failover(paths: Paths, failure: Failure) {
    let mut f = FailoverLab::new(paths);
    let active = f.wait_one_active(Duration::from_secs(10));
    let (server, server_addr) = f.server();
    let (server, view) = (server.alias(), f.b_pod_view);
    ping_until(f.client(), view.into(), Duration::from_secs(15))
        .unwrap_or_else(|| panic!("no ping through the active replica {active}\n{}", f.logs()));

    // Failover, under a ping train and a 256 MiB transfer.
    let train = PingTrain::start(f.client(), view);
    let client = f.client().alias();
    transfer_across(
        &server,
        server_addr,
        &client,
        view,
        TRANSFER,
        FAIL_AFTER,
        || f.fail(active, failure),
    );
    std::thread::sleep(Duration::from_secs(1));
    let (gap, replies) = train.stop();
    let standby = 1 - active;
    let took_over = f.actives();
    eprintln!(
        "{paths:?}, {failure:?} of replica {active}: longest ping gap {gap:?} ({replies} replies), transfer intact; active now {took_over:?}"
    );
    assert!(gap <= MAX_GAP, "failover gap {gap:?}\n{}", f.logs());
    assert!(took_over.contains(&standby), "{took_over:?}\n{}", f.logs());

    // Fail-back: the old replica returns (as a standby: nopreempt), and
    // the traffic does not stop for longer than the bound again.
    let train = PingTrain::start(f.client(), view);
    f.recover(active, failure);
    let t = Instant::now();
    while f.actives() != [standby] && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    let (gap, replies) = train.stop();
    eprintln!(
        "{paths:?}, fail-back of replica {active}: longest ping gap {gap:?} ({replies} replies); active {:?}",
        f.actives()
    );
    assert_eq!(f.actives(), [standby], "{}", f.logs());
    assert!(gap <= MAX_GAP, "fail-back gap {gap:?}\n{}", f.logs());
    tcp_transfer_via(
        &server,
        server_addr.into(),
        f.client(),
        view.into(),
        1 << 20,
    );
}

#[test]
fn kill_9_of_the_active_gateway_through_nats() {
    failover(Paths::Rendezvous, Failure::Kill9);
}

#[test]
fn link_cut_of_the_active_gateway_through_nats() {
    failover(Paths::Rendezvous, Failure::LinkCut);
}

#[test]
fn kill_9_of_the_active_gateway_with_static_endpoints() {
    failover(Paths::Static, Failure::Kill9);
}

#[test]
fn link_cut_of_the_active_gateway_with_static_endpoints() {
    failover(Paths::Static, Failure::LinkCut);
}

/// A partition between the gateways only (VRRP advertisements lost, both
/// still on the network): both replicas become active. Traffic suffers
/// (the peer encrypts to the replica that handshook last and sends to the
/// one that spoke last; the rendezvous keeps only the newest registration)
/// but nothing is corrupted or lost for good: every packet is
/// authenticated, so a TCP transfer that runs across the split arrives
/// intact once it heals, and keepalived then demotes one replica and the
/// traffic settles on the other.
#[test]
fn two_active_replicas_corrupt_nothing_and_settle() {
    let f = FailoverLab::new(Paths::Rendezvous);
    let first = f.wait_one_active(Duration::from_secs(10));
    let other = 1 - first;
    let (server, server_addr) = f.server();
    let view = f.b_pod_view;
    ping_until(f.client(), view.into(), Duration::from_secs(15)).expect("first ping");
    let cluster = f.lab.site("a").cluster.as_ref().expect("cluster");
    let other_ns = cluster.node_ns(f.replicas[other].node);
    std::thread::scope(|s| {
        // A transfer that starts before the split and ends after it.
        let transfer = s.spawn(|| {
            tcp_transfer_via(
                server,
                server_addr.into(),
                f.client(),
                view.into(),
                64 << 20,
            )
        });
        let block = "table ip split {\n chain input {\n type filter hook input priority 0;\n ip protocol vrrp drop\n }\n}\n";
        other_ns
            .run_with_input("nft", &["-f", "-"], block)
            .expect("block VRRP");
        let t = Instant::now();
        while f.actives().len() != 2 {
            assert!(t.elapsed() < Duration::from_secs(5), "{}", f.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
        let split_after = t.elapsed();
        let train = PingTrain::start(f.client(), view);
        std::thread::sleep(Duration::from_secs(3));
        let (gap, replies) = train.stop();
        eprintln!(
            "two actives after {split_after:?}; while split: longest ping gap {gap:?}, {replies} replies in 3 s"
        );
        assert_eq!(f.actives().len(), 2, "still split\n{}", f.logs());
        // The partition heals: one replica is demoted, traffic flows.
        other_ns
            .run("nft", &["delete", "table", "ip", "split"])
            .expect("unblock VRRP");
        let t = Instant::now();
        let active = f.wait_one_active(Duration::from_secs(5));
        eprintln!("healed: replica {active} active after {:?}", t.elapsed());
        transfer
            .join()
            .expect("the transfer across the split arrived intact");
    });
    let train = PingTrain::start(f.client(), view);
    std::thread::sleep(Duration::from_secs(3));
    let (gap, replies) = train.stop();
    eprintln!("after healing: longest ping gap {gap:?}, {replies} replies");
    assert!(gap <= MAX_GAP, "after healing: {gap:?}\n{}", f.logs());
    for r in &f.replicas {
        let d = r.daemon.as_ref().expect("running");
        assert!(d.status().packet_threads_alive, "{}", f.logs());
    }
    assert!(f.daemon_b.status().packet_threads_alive);
}
