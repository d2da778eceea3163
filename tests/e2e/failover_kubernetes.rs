//! Standby gateways on Kubernetes, end to end: two replicas of site a's
//! gateway (the same key) on two nodes of a cluster site, each a real
//! `causeway up` with `[failover] election = "kubernetes"`, electing the
//! active one with a Lease on a **simulated** Kubernetes API server
//! (`causeway::election::fake_api_server`: HTTPS with a test CA, Leases
//! only; no real API server runs on these machines). A node agent on a
//! third node routes the views to the active replica's node address (no
//! `route_via`: what a Kubernetes cluster does). Both sites are behind NATs
//! and meet through a rendezvous.
//!
//! A pod on the third node pings site b's pod every 20 ms and sends it a
//! TCP stream while the active replica is killed (`kill -9`): the other
//! takes over once the Lease expires, and the longest gap in the ping
//! train is reported and bounded. The killed replica comes back as a
//! standby; then the active one is stopped cleanly (SIGTERM): it releases
//! the Lease and the other takes over within about one retry period.
//!
//! How a daemon finds the simulated API server: as in a pod, from
//! `KUBERNETES_SERVICE_HOST`/`_PORT`, `POD_NAME`/`POD_NAMESPACE` and the
//! service account's files under `/var/run/secrets/kubernetes.io/
//! serviceaccount/`. Those files are put in a tmpfs over `/run` (`/var/run`
//! is a symlink to it) in a private mount namespace of the daemon's own,
//! never in the host's `/run`; the wrapper shell `exec`s the daemon, so the
//! process the test holds (and kills) is the daemon. The simulated API
//! server listens inside the lab, on site a's NAT router's node-LAN
//! address.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use causeway::core::Role;
use causeway::election::fake_api_server::{FakeApiServer, pem_certificate};
use causeway::election::kubernetes::DEFAULT_LEASE_NAME;
use causeway_testbed::{ClusterSpec, Lab, LabSpec, Nat, Netns, SiteSpec};

use crate::common::*;

/// The node of site a whose pod sends: not a gateway.
const CLIENT_NODE: usize = 2;
/// The Lease's namespace (the replicas' `POD_NAMESPACE`).
const NAMESPACE: &str = "causeway-e2e";
/// `[failover]` timing: the "fast" column of docs/failover-kubernetes.md.
const LEASE_DURATION: Duration = Duration::from_millis(1000);
const RENEW_DEADLINE: Duration = Duration::from_millis(700);
const RETRY_PERIOD: Duration = Duration::from_millis(200);
/// The longest gap in the ping train the issue allows after a crash.
const MAX_GAP: Duration = Duration::from_secs(3);
/// The bytes sent across each failover, and after how many it is caused.
const TRANSFER: usize = 128 << 20;
const FAIL_AFTER: usize = 16 << 20;
/// Where the service account's files are in a pod.
const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Runs in the daemon's own mount namespace (`unshare --mount`): a tmpfs
/// over `/run`, the service account's files in it, then `exec` of the
/// daemon. `$1`: the directory with `token` and `ca.crt`; `$2`: the
/// binary; `$3`: the config.
const IN_POD: &str = r#"set -e
[ "$(readlink -f /var/run)" = /run ]
mount -t tmpfs -o mode=0755,size=1m causeway-e2e-pod /run
mkdir -p /var/run/secrets/kubernetes.io/serviceaccount
cp "$1/token" "$1/ca.crt" /var/run/secrets/kubernetes.io/serviceaccount/
exec "$2" up --config "$3"
"#;

/// The simulated API server ([`FakeApiServer`]) on its own thread and
/// tokio runtime, listening inside the lab, and the test CA's certificate
/// its clients trust.
struct SimulatedApiServer {
    server: Option<Arc<FakeApiServer>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    host: Ipv4Addr,
    port: u16,
    ca_pem: String,
}

impl SimulatedApiServer {
    /// Starts it in `ns` on `host` (an address of `ns`), with a server
    /// certificate for that address from a new test CA.
    fn start(ns: &Netns, host: Ipv4Addr) -> SimulatedApiServer {
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
        let key = rcgen::KeyPair::generate().expect("server key");
        let cert = rcgen::CertificateParams::new(vec![host.to_string()])
            .expect("server certificate params")
            .signed_by(&key, &ca, &ca_key)
            .expect("server certificate");
        let listener = ns.enter(|| {
            let l = std::net::TcpListener::bind((host, 0)).expect("bind the simulated API server");
            l.set_nonblocking(true).expect("nonblocking");
            l
        });
        let port = listener.local_addr().expect("addr").port();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let server = {
            let _in_runtime = runtime.enter();
            FakeApiServer::start(
                tokio::net::TcpListener::from_std(listener).expect("tokio listener"),
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .expect("start the simulated API server")
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            runtime.block_on(async {
                let _ = stopped.await;
            });
        });
        SimulatedApiServer {
            server: Some(Arc::new(server)),
            stop: Some(stop),
            thread: Some(thread),
            host,
            port,
            ca_pem: pem_certificate(ca.der()),
        }
    }

    fn server(&self) -> &Arc<FakeApiServer> {
        self.server.as_ref().expect("running")
    }

    /// Who holds the gateways' Lease now.
    fn holder(&self) -> Option<String> {
        self.server().holder(NAMESPACE, DEFAULT_LEASE_NAME)
    }

    /// The Lease's `leaseTransitions`.
    fn transitions(&self) -> u64 {
        self.server()
            .lease(NAMESPACE, DEFAULT_LEASE_NAME)
            .and_then(|l| l["spec"]["leaseTransitions"].as_u64())
            .unwrap_or(0)
    }

    /// Writes a pod's service-account files for `token` into `dir`
    /// (`token`, `ca.crt`), and accepts that token.
    fn service_account(&self, dir: &Path, token: &str) {
        std::fs::create_dir_all(dir).expect("service account dir");
        std::fs::write(dir.join("token"), format!("{token}\n")).expect("token");
        std::fs::write(dir.join("ca.crt"), &self.ca_pem).expect("ca.crt");
        self.server().accept_token(token);
    }
}

impl Drop for SimulatedApiServer {
    fn drop(&mut self) {
        self.server = None;
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One replica of site a's gateway: its node, files and daemon.
struct Replica {
    node: usize,
    /// Its pod name: `POD_NAME`, the Lease's `holderIdentity`.
    pod: String,
    files: SiteFiles,
    config: PathBuf,
    daemon: Option<Daemon>,
}

/// Fields drop in order: the daemons first (a clean stop still reaches the
/// API server), the lab last.
struct KubeLab {
    replicas: Vec<Replica>,
    agent: NodeAgent,
    daemon_b: Daemon,
    _rendezvous: Rendezvous,
    api: SimulatedApiServer,
    _key_a: SiteFiles,
    _files_b: SiteFiles,
    /// Where site a's pods reach b's first pod.
    b_pod_view: Ipv4Addr,
    /// b's view CIDR as a's nodes route it.
    view_net: String,
    lab: Lab,
}

impl KubeLab {
    fn new() -> KubeLab {
        let cidr = "10.0.0.0/16";
        let a = SiteSpec::new("a", vec![cidr.parse().expect("cidr")])
            .nat(Nat::PortPreserving)
            .cluster(ClusterSpec::new(3, 2));
        let b = SiteSpec::new("b", vec![cidr.parse().expect("cidr")]).nat(Nat::PortPreserving);
        let lab = Lab::build(&LabSpec { sites: vec![a, b] }).expect("lab");
        lab.site("b").remove_ipv6_underlay().expect("flush IPv6");
        let cluster = lab.site("a").cluster.as_ref().expect("cluster");
        let router = lab.site("a").nat_router.as_ref().expect("NAT router");
        let api = SimulatedApiServer::start(router, cluster.router_addr);

        let files_b = SiteFiles::new();
        let key_a = SiteFiles::new();
        let rendezvous = Rendezvous::start(
            lab.internet(),
            IpAddr::V4(lab.internet_addr()),
            &[("a", &key_a.public_key), ("b", &files_b.public_key)],
        );
        let rdv = format!(
            "[[rendezvous]]\naddress = \"{}:{RENDEZVOUS_QUIC_PORT}\"\npublic_key = {:?}\n\n",
            lab.internet_addr(),
            rendezvous.public_key
        );
        let secret = key_a.path("cluster.secret");
        std::fs::write(&secret, "the cluster secret of this failover test\n").expect("secret");
        // Both replicas: the same key and config; namespace and identity
        // from the pod (POD_NAMESPACE, POD_NAME); no route_via.
        let peers_a = peer_toml("b", &files_b.public_key, &[cidr], None)
            + &rdv
            + &format!(
                "[failover]\nelection = \"kubernetes\"\nlease_duration_ms = {}\n\
                 renew_deadline_ms = {}\nretry_period_ms = {}\n\n",
                LEASE_DURATION.as_millis(),
                RENEW_DEADLINE.as_millis(),
                RETRY_PERIOD.as_millis()
            )
            + &format!(
                "[cluster]\nlisten = \"0.0.0.0:{CLUSTER_PORT}\"\nsecret_file = {secret:?}\n"
            );
        let replicas = (0..2)
            .map(|node| {
                let files = key_a.clone_key();
                let config = files.write_config("a", &[cidr], &peers_a);
                let pod = format!("causeway-gateway-node{node}");
                api.service_account(&files.path("serviceaccount"), &format!("token-{pod}"));
                Replica {
                    node,
                    pod,
                    files,
                    config,
                    daemon: None,
                }
            })
            .collect();
        let config_b = files_b.write_config(
            "b",
            &[cidr],
            &(peer_toml("a", &key_a.public_key, &[cidr], None) + &rdv),
        );
        let daemon_b = Daemon::start(&lab.site("b").gateway, &files_b, &config_b);
        let gateways = [cluster.node(0).addr, cluster.node(1).addr];
        let agent = NodeAgent::start(
            cluster.node_ns(CLIENT_NODE),
            key_a.dir.path(),
            "node-agent",
            &gateways,
            &secret,
        );
        let mut lab = KubeLab {
            replicas,
            agent,
            daemon_b,
            _rendezvous: rendezvous,
            api,
            _key_a: key_a,
            _files_b: files_b,
            b_pod_view: Ipv4Addr::UNSPECIFIED,
            view_net: String::new(),
            lab,
        };
        for i in 0..2 {
            lab.start_replica(i);
        }
        let status = lab.replicas[0].daemon.as_ref().expect("daemon").status();
        lab.b_pod_view = view_of(&status, lab.lab.site("b").pods[0].addr);
        lab.view_net = status.peers[0].views[0].view.clone();
        lab
    }

    fn cluster(&self) -> &causeway_testbed::Cluster {
        self.lab.site("a").cluster.as_ref().expect("cluster")
    }

    /// Starts replica `i`'s daemon as in a pod: its own mount namespace
    /// with the service account's files, the pod's environment.
    fn start_replica(&mut self, i: usize) {
        let ns = self.cluster().node_ns(self.replicas[i].node).alias();
        let r = &self.replicas[i];
        let mut cmd = ns.command("unshare");
        cmd.args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            IN_POD,
            "sh",
        ])
        .arg(r.files.path("serviceaccount"))
        .arg(causeway_bin())
        .arg(&r.config)
        .env("KUBERNETES_SERVICE_HOST", self.api.host.to_string())
        .env("KUBERNETES_SERVICE_PORT", self.api.port.to_string())
        .env("POD_NAME", &r.pod)
        .env("POD_NAMESPACE", NAMESPACE);
        let mut daemon = Daemon::start_command(&ns, &r.files, cmd);
        check_in_pod(&mut daemon, &r.files.path("serviceaccount"));
        self.replicas[i].daemon = Some(daemon);
    }

    /// The replicas that say they are active.
    fn actives(&self) -> Vec<usize> {
        active_replicas(self.replicas.iter().map(|r| r.daemon.as_ref()))
    }

    /// Waits until exactly one replica is active; returns it.
    fn wait_one_active(&self, within: Duration) -> usize {
        wait_one_active(|| self.actives(), within, || self.logs())
    }

    /// Waits until the client's node routes b's view via replica `i`'s
    /// node address (the node agent's doing); returns how long that took.
    fn wait_routed_via(&self, i: usize, within: Duration) -> Duration {
        let via = self.cluster().node(self.replicas[i].node).addr;
        let ns = self.cluster().node_ns(CLIENT_NODE);
        let wanted = format!("{} via {via} ", self.view_net);
        let t = Instant::now();
        loop {
            let routes = ns.ip(&["route", "show", "proto", "202"]).expect("routes");
            if routes.contains(&wanted) {
                return t.elapsed();
            }
            assert!(
                t.elapsed() < within,
                "no node route {wanted:?}: {routes}\n--- agent:\n{}\n{}",
                self.agent.log_text(),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn client(&self) -> &Netns {
        &self.cluster().node(CLIENT_NODE).pods[0].ns
    }

    fn server(&self) -> (&Netns, Ipv4Addr) {
        let pod = &self.lab.site("b").pods[0];
        (&pod.ns, pod.addr)
    }

    fn logs(&self) -> String {
        let mut text = String::new();
        for (i, r) in self.replicas.iter().enumerate() {
            if let Some(d) = &r.daemon {
                text += &format!("--- replica {i} ({}):\n{}", r.pod, d.log_text());
            }
        }
        text + &format!(
            "--- b:\n{}--- Lease: {:?}\n",
            self.daemon_b.log_text(),
            self.api.server().lease(NAMESPACE, DEFAULT_LEASE_NAME)
        )
    }
}

/// Checks that `daemon` runs as in a pod and nowhere else: the process
/// held is the daemon itself (the wrapper exec'd it), in a mount
/// namespace of its own where the service account's files are, and the
/// host's `/run` has none of them.
fn check_in_pod(daemon: &mut Daemon, service_account: &Path) {
    let pid = daemon.child.pid();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe");
    let bin = std::fs::canonicalize(causeway_bin()).expect("binary");
    assert_eq!(exe, bin, "the process held is the daemon");
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/mnt")).expect("mnt ns");
    assert_ne!(ns(&pid.to_string()), ns("self"), "own mount namespace");
    // Through /run: /proc/PID/root resolves the absolute symlink /var/run
    // in the reader's root, not the daemon's.
    let seen = std::fs::read_to_string(format!(
        "/proc/{pid}/root/run/secrets/kubernetes.io/serviceaccount/token"
    ))
    .expect("the daemon sees the token");
    let given = std::fs::read_to_string(service_account.join("token")).expect("token");
    assert_eq!(seen, given);
    let host = Path::new(SERVICE_ACCOUNT_DIR).join("token");
    assert!(
        std::fs::read_to_string(&host).ok().as_deref() != Some(given.as_str()),
        "the token leaked into the host's {}",
        host.display()
    );
}

/// Records every change of the Lease's holder (polled every 2 ms) until
/// stopped: `(when, holder)`, starting with the holder at the start.
struct HolderWatch {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Instant, Option<String>)>>,
}

impl HolderWatch {
    fn start(api: &SimulatedApiServer) -> HolderWatch {
        let state = Arc::clone(api.server());
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut seen: Vec<(Instant, Option<String>)> = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let holder = state.holder(NAMESPACE, DEFAULT_LEASE_NAME);
                if seen.last().map(|(_, h)| h) != Some(&holder) {
                    seen.push((Instant::now(), holder));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            seen
        });
        HolderWatch { stop, thread }
    }

    fn stop(self) -> Vec<(Instant, Option<String>)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("holder watch")
    }
}

/// The first time `holder` held the Lease in `changes`, at or after `from`.
fn held_at(changes: &[(Instant, Option<String>)], holder: &str, from: Instant) -> Option<Instant> {
    changes
        .iter()
        .find(|(t, h)| *t >= from && h.as_deref() == Some(holder))
        .map(|(t, _)| *t)
}

#[test]
fn kubernetes_lease_failover_after_kill_9_and_after_a_clean_stop() {
    let mut f = KubeLab::new();

    // Exactly one replica is active, the one the Lease names, and stays so
    // for a few lease durations.
    let first = f.wait_one_active(Duration::from_secs(10));
    std::thread::sleep(LEASE_DURATION * 3);
    assert_eq!(f.actives(), [first], "{}", f.logs());
    assert_eq!(
        f.api.holder().as_deref(),
        Some(f.replicas[first].pod.as_str())
    );
    let other = 1 - first;
    let routed = f.wait_routed_via(first, Duration::from_secs(10));
    eprintln!(
        "replica {first} ({}) active; node {CLIENT_NODE} routes b's view via its node ({routed:?})",
        f.replicas[first].pod
    );
    let (server, server_addr) = f.server();
    let (server, view) = (server.alias(), f.b_pod_view);
    ping_until(f.client(), view.into(), Duration::from_secs(15))
        .unwrap_or_else(|| panic!("no ping through the active replica {first}\n{}", f.logs()));

    // kill -9 of the active replica under a ping train and a transfer: the
    // other takes over once the Lease expires (lease_duration after it last
    // saw it renewed, at its next read).
    let transitions = f.api.transitions();
    let watch = HolderWatch::start(&f.api);
    let train = PingTrain::start(f.client(), view);
    let client = f.client().alias();
    let mut killed_at = None;
    transfer_across(
        &server,
        server_addr,
        &client,
        view,
        TRANSFER,
        FAIL_AFTER,
        || {
            let mut daemon = f.replicas[first].daemon.take().expect("running");
            killed_at = Some(Instant::now());
            daemon.child.kill9().expect("kill -9");
        },
    );
    std::thread::sleep(Duration::from_secs(1));
    let (gap, replies) = train.stop();
    let changes = watch.stop();
    let killed_at = killed_at.expect("killed");
    let took_over = held_at(&changes, &f.replicas[other].pod, killed_at);
    eprintln!(
        "kill -9 of replica {first}: longest ping gap {gap:?} ({replies} replies), transfer \
         intact; Lease taken by replica {other} {:?} after the kill (lease_duration + \
         retry_period = {:?})",
        took_over.map(|t| t - killed_at),
        LEASE_DURATION + RETRY_PERIOD
    );
    assert!(
        took_over.is_some(),
        "Lease holders: {changes:?}\n{}",
        f.logs()
    );
    assert_eq!(f.actives(), [other], "{}", f.logs());
    assert_eq!(f.api.transitions(), transitions + 1, "one change of holder");
    assert!(gap <= MAX_GAP, "kill -9 gap {gap:?}\n{}", f.logs());
    f.wait_routed_via(other, Duration::from_secs(5));

    // The killed replica comes back (the same pod, its container
    // restarted): a standby, the Lease stays where it is.
    f.start_replica(first);
    std::thread::sleep(LEASE_DURATION * 2);
    assert_eq!(f.actives(), [other], "{}", f.logs());
    let restarted = f.replicas[first].daemon.as_ref().expect("running").status();
    assert_eq!(restarted.role, Role::Standby);

    // A clean stop of the active replica: it goes standby, releases the
    // Lease, and the restarted one takes it at its next read.
    let watch = HolderWatch::start(&f.api);
    let train = PingTrain::start(f.client(), view);
    let mut stopping_at = None;
    transfer_across(
        &server,
        server_addr,
        &client,
        view,
        TRANSFER,
        FAIL_AFTER,
        || {
            let daemon = f.replicas[other].daemon.take().expect("running");
            stopping_at = Some(Instant::now());
            daemon.stop();
        },
    );
    std::thread::sleep(Duration::from_secs(1));
    let (gap, replies) = train.stop();
    let changes = watch.stop();
    let stopping_at = stopping_at.expect("stopped");
    let released = changes
        .iter()
        .find(|(t, h)| *t >= stopping_at && h.is_none())
        .map(|(t, _)| *t);
    let took_over = held_at(&changes, &f.replicas[first].pod, stopping_at);
    eprintln!(
        "clean stop of replica {other}: longest ping gap {gap:?} ({replies} replies), transfer \
         intact; Lease released {:?} after SIGTERM, taken by replica {first} {:?} after the \
         release (retry_period = {RETRY_PERIOD:?})",
        released.map(|t| t - stopping_at),
        took_over.zip(released).map(|(t, r)| t - r),
    );
    let (Some(released), Some(took_over)) = (released, took_over) else {
        panic!("Lease holders after SIGTERM: {changes:?}\n{}", f.logs());
    };
    assert!(took_over >= released, "taken only after the release");
    // Taken at the next read after the release, not after an expiry.
    assert!(
        took_over - released < LEASE_DURATION,
        "taken {:?} after the release: the release was not seen\n{}",
        took_over - released,
        f.logs()
    );
    assert!(
        gap < LEASE_DURATION + RETRY_PERIOD,
        "clean stop gap {gap:?}: no faster than after a crash\n{}",
        f.logs()
    );
    assert_eq!(f.actives(), [first], "{}", f.logs());
    assert_eq!(
        f.api.holder().as_deref(),
        Some(f.replicas[first].pod.as_str())
    );
    f.wait_routed_via(first, Duration::from_secs(5));
    assert!(ping_until(f.client(), view.into(), Duration::from_secs(5)).is_some());
}
