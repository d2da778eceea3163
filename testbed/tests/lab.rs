//! Builds real topologies; needs root. Each test owns its own lab.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::Command;
use std::time::Duration;

use causeway_testbed::{Lab, LabSpec, Nat, Netns, SiteSpec, Wan};

fn net(s: &str) -> causeway_testbed::IpNet {
    s.parse().expect("valid CIDR")
}

fn ping(ns: &Netns, dst: impl Into<IpAddr>) -> Option<Duration> {
    ns.ping(dst.into(), Duration::from_millis(500))
        .expect("ping runs")
}

/// Pings until a reply comes (resolves neighbours across lossy links).
fn ping_until_reply(ns: &Netns, dst: impl Into<IpAddr>) -> Duration {
    let dst = dst.into();
    (0..40)
        .find_map(|_| ns.ping(dst, Duration::from_millis(300)).expect("ping runs"))
        .unwrap_or_else(|| panic!("no reply from {dst} in {}", ns.name()))
}

fn udp_socket(ns: &Netns, port: u16) -> UdpSocket {
    ns.enter(|| UdpSocket::bind(("0.0.0.0", port)))
        .expect("bind")
}

fn recv(socket: &UdpSocket, timeout: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    socket.set_read_timeout(Some(timeout)).expect("timeout");
    let mut buf = [0u8; 1500];
    socket
        .recv_from(&mut buf)
        .ok()
        .map(|(n, from)| (buf[..n].to_vec(), from))
}

/// Names of the namespaces that exist now and belong to `id`.
fn namespaces_of(id: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(&format!("{id}-")))
        .map(str::to_owned)
        .collect()
}

#[test]
fn two_sites_without_nat_reach_each_other_but_pods_do_not() {
    let lab = Lab::build(&LabSpec {
        sites: vec![
            SiteSpec::new("a", vec![net("10.0.0.0/16"), net("fd00:10::/64")]).pods(2),
            SiteSpec::new("b", vec![net("10.1.0.0/16")]),
        ],
    })
    .expect("build");
    let (a, b) = (lab.site("a"), lab.site("b"));
    assert_eq!(a.wan_addr, a.public_addr);
    assert_eq!(a.wan_addr.to_string(), "198.18.1.2");
    assert_eq!(b.wan_addr.to_string(), "198.18.2.2");
    assert_eq!(a.pods[0].addr.to_string(), "10.0.1.2");
    assert_eq!(
        a.pods[1].addr6.map(|a| a.to_string()).as_deref(),
        Some("fd00:10::2:2")
    );
    assert!(b.pods[0].addr6.is_none());

    // Gateways reach each other across the internet, over IPv4 and IPv6.
    assert!(ping(&a.gateway, b.wan_addr).is_some());
    assert!(ping(&b.gateway, a.wan_addr).is_some());
    assert!(ping(&a.gateway, b.wan_addr6).is_some());
    assert!(ping(&a.gateway, lab.internet_addr()).is_some());
    // Pods reach their own gateway.
    for pod in &a.pods {
        assert!(
            ping(&pod.ns, pod.gateway_addr).is_some(),
            "{}",
            pod.ns.name()
        );
        assert!(
            ping(&pod.ns, pod.gateway_addr6.expect("v6")).is_some(),
            "{}",
            pod.ns.name()
        );
    }
    assert!(ping(&b.pods[0].ns, b.pods[0].gateway_addr).is_some());
    // UDP between gateways, from sockets made inside the namespaces.
    let server = udp_socket(&b.gateway, 0);
    let port = server.local_addr().expect("addr").port();
    let client = udp_socket(&a.gateway, 0);
    client.send_to(b"hello", (b.wan_addr, port)).expect("send");
    let (data, from) = recv(&server, Duration::from_secs(2)).expect("datagram");
    assert_eq!((data.as_slice(), from.ip()), (&b"hello"[..], a.wan_addr));

    // Without a tunnel a pod cannot reach the other site's pods, and the
    // attempt dies at the internet, counted as a leak.
    assert_eq!(lab.leaked_packets().expect("counter"), 0);
    assert!(ping(&a.pods[0].ns, b.pods[0].addr).is_none());
    assert!(lab.leaked_packets().expect("counter") > 0);
    assert!(
        lab.internet().ip(&["route", "get", "10.1.1.2"]).is_err(),
        "the internet must not route pod CIDRs"
    );
    let routes = a.gateway.ip(&["route", "show"]).expect("routes");
    assert!(
        !routes.contains("10.1."),
        "gateway a must not route to site b's pods: {routes}"
    );
}

#[test]
fn gateways_behind_nat_reach_out_but_nothing_gets_in() {
    let lab = Lab::build(&LabSpec {
        sites: vec![
            SiteSpec::new("home", vec![net("10.0.0.0/16")]).nat(Nat::PortPreserving),
            SiteSpec::new("cgnat", vec![net("10.0.0.0/16")]).nat(Nat::Symmetric),
            SiteSpec::new("public", vec![net("10.2.0.0/16")]),
        ],
    })
    .expect("build");
    let (home, cgnat, public) = (lab.site("home"), lab.site("cgnat"), lab.site("public"));
    assert_eq!(home.wan_addr.to_string(), "172.16.1.2");
    assert_eq!(home.public_addr.to_string(), "198.18.1.2");
    assert_eq!(cgnat.public_addr.to_string(), "198.18.2.2");
    assert!(ping(&home.gateway, public.public_addr).is_some());
    assert!(ping(&cgnat.gateway, public.public_addr).is_some());

    let servers = [
        udp_socket(&public.gateway, 0),
        udp_socket(&public.gateway, 0),
    ];
    let ports = servers
        .each_ref()
        .map(|s| s.local_addr().expect("addr").port());
    // Port-preserving: both destinations see the same, original port.
    let client = udp_socket(&home.gateway, 40_000);
    let mut seen = Vec::new();
    for (server, port) in servers.iter().zip(ports) {
        client
            .send_to(b"out", (public.public_addr, port))
            .expect("send");
        let (_, from) = recv(server, Duration::from_secs(2)).expect("datagram through the NAT");
        assert_eq!(from.ip(), home.public_addr);
        seen.push(from);
    }
    assert_eq!(seen[0].port(), 40_000);
    assert_eq!(seen[0], seen[1]);
    // The reply comes back through the mapping.
    servers[0].send_to(b"reply", seen[0]).expect("send");
    assert_eq!(
        recv(&client, Duration::from_secs(2)).map(|(d, _)| d),
        Some(b"reply".to_vec())
    );
    // Unsolicited: from a socket the gateway never sent to, and to a port it never used.
    let stranger = udp_socket(&public.gateway, 0);
    stranger.send_to(b"knock", seen[0]).expect("send");
    let listener = udp_socket(&home.gateway, 40_001);
    stranger
        .send_to(b"knock", (home.public_addr, 40_001))
        .expect("send");
    assert!(
        recv(&client, Duration::from_millis(300)).is_none(),
        "unsolicited datagram passed the NAT"
    );
    assert!(
        recv(&listener, Duration::from_millis(300)).is_none(),
        "unsolicited datagram passed the NAT"
    );
    // Flushing the NAT forgets the mapping: the old reply path is closed.
    home.flush_nat_mappings().expect("flush");
    servers[0].send_to(b"late", seen[0]).expect("send");
    assert!(
        recv(&client, Duration::from_millis(300)).is_none(),
        "mapping survived the flush"
    );

    // Symmetric: each destination sees its own port.
    let client = udp_socket(&cgnat.gateway, 40_000);
    let mut seen = Vec::new();
    for (server, port) in servers.iter().zip(ports) {
        client
            .send_to(b"out", (public.public_addr, port))
            .expect("send");
        let (_, from) = recv(server, Duration::from_secs(2)).expect("datagram through the NAT");
        assert_eq!(from.ip(), cgnat.public_addr);
        seen.push(from);
    }
    assert_ne!(
        seen[0].port(),
        seen[1].port(),
        "symmetric NAT reused a mapping"
    );
    let stranger = udp_socket(&public.gateway, 0);
    stranger.send_to(b"knock", seen[0]).expect("send");
    assert!(
        recv(&client, Duration::from_millis(300)).is_none(),
        "unsolicited datagram passed the NAT"
    );

    // IPv6 is routed, not translated, and filtered the same way.
    assert!(ping(&home.gateway, public.wan_addr6).is_some());
    assert!(
        ping(&public.gateway, home.wan_addr6).is_none(),
        "unsolicited IPv6 passed the NAT router"
    );
}

#[test]
fn wan_delay_holds_frames_and_tcp_still_works() {
    let delay = Wan {
        delay: Duration::from_millis(20),
        loss: 0.0,
    };
    let lab = Lab::build(&LabSpec {
        sites: vec![
            SiteSpec::new("far", vec![net("10.0.0.0/16")]).wan(delay),
            SiteSpec::new("near", vec![net("10.1.0.0/16")]),
        ],
    })
    .expect("build");
    let (far, near) = (lab.site("far"), lab.site("near"));
    ping_until_reply(&far.gateway, near.wan_addr);
    let rtt = ping(&far.gateway, near.wan_addr).expect("reply");
    assert!(
        rtt >= Duration::from_millis(40),
        "RTT {rtt:?} below twice the one-way delay"
    );
    assert!(ping(&far.gateway, near.wan_addr6).is_some_and(|rtt| rtt >= Duration::from_millis(40)));

    // A TCP transfer through the wire: checksums and segment sizes must survive.
    let listener = near
        .gateway
        .enter(|| TcpListener::bind("0.0.0.0:0"))
        .expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let sender = far
        .gateway
        .enter(|| TcpStream::connect((near.wan_addr, port)))
        .expect("connect");
    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let writer = std::thread::spawn({
        let payload = payload.clone();
        move || {
            let mut sender = sender;
            sender.write_all(&payload).expect("write");
        }
    });
    let (mut stream, _) = listener.accept().expect("accept");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut received = Vec::new();
    stream.read_to_end(&mut received).expect("read");
    writer.join().expect("writer");
    assert!(
        received == payload,
        "TCP payload corrupted through the WAN emulator"
    );

    let stats = lab.wan_stats();
    assert!(stats.forwarded > 500, "{stats:?}");
    assert_eq!(stats.lost, 0);
    assert!(lab.wan_cpu_time() > Duration::ZERO);
}

#[test]
fn wan_loss_drops_a_plausible_share() {
    let lossy = Wan {
        delay: Duration::ZERO,
        loss: 0.5,
    };
    let lab = Lab::build(&LabSpec {
        sites: vec![
            SiteSpec::new("lossy", vec![net("10.0.0.0/16")]).wan(lossy),
            SiteSpec::new("clean", vec![net("10.1.0.0/16")]),
        ],
    })
    .expect("build");
    let (lossy, clean) = (lab.site("lossy"), lab.site("clean"));
    ping_until_reply(&lossy.gateway, clean.wan_addr);
    let server = udp_socket(&clean.gateway, 0);
    let port = server.local_addr().expect("addr").port();
    let client = udp_socket(&lossy.gateway, 0);
    for i in 0..200u32 {
        client
            .send_to(&i.to_be_bytes(), (clean.wan_addr, port))
            .expect("send");
    }
    let mut received = 0;
    while recv(&server, Duration::from_millis(500)).is_some() {
        received += 1;
    }
    let lost = 200 - received;
    assert!(
        (40..=160).contains(&lost),
        "lost {lost} of 200 datagrams at 50% loss"
    );
    assert!(lab.wan_stats().lost >= 40, "{:?}", lab.wan_stats());
}

#[test]
fn drop_removes_namespaces_and_kills_processes() {
    let lab = Lab::build(&LabSpec {
        sites: vec![
            SiteSpec::new("a", vec![net("10.0.0.0/16")])
                .pods(2)
                .nat(Nat::PortPreserving),
            SiteSpec::new("b", vec![net("10.1.0.0/16")]).wan(Wan {
                delay: Duration::from_millis(1),
                loss: 0.0,
            }),
        ],
    })
    .expect("build");
    let id = lab.id().to_owned();
    // 1 internet + a: gw, nat, 2 pods + b: gw, wire, 1 pod.
    assert_eq!(namespaces_of(&id).len(), 8, "{:?}", namespaces_of(&id));
    // A process started without a guard (ignores SIGTERM) must still go.
    let pod = &lab.site("a").pods[0].ns;
    let mut stray = pod
        .command("sh")
        .args(["-c", "trap '' TERM; sleep 60"])
        .spawn()
        .expect("spawn");
    let mut guarded = pod.spawn(pod.command("sleep").arg("60")).expect("spawn");
    assert!(
        guarded
            .wait_timeout(Duration::from_millis(50))
            .expect("wait")
            .is_none()
    );
    std::thread::sleep(Duration::from_millis(100));
    drop(lab);
    assert_eq!(namespaces_of(&id), Vec::<String>::new());
    assert!(
        stray.try_wait().expect("wait").is_some(),
        "process in a pod survived teardown"
    );
    assert!(
        guarded
            .wait_timeout(Duration::from_secs(1))
            .expect("wait")
            .is_some()
    );
}

#[test]
fn a_panicking_test_still_tears_down() {
    let mut id = String::new();
    let result = catch_unwind(AssertUnwindSafe(|| {
        let lab = Lab::build(&LabSpec {
            sites: vec![SiteSpec::new("a", vec![net("10.0.0.0/16")])],
        })
        .expect("build");
        id = lab.id().to_owned();
        assert!(!namespaces_of(&id).is_empty());
        panic!("the test failed");
    }));
    assert!(result.is_err());
    assert!(!id.is_empty());
    assert_eq!(namespaces_of(&id), Vec::<String>::new());
}

#[test]
fn enter_runs_in_the_namespace_and_reraises_panics() {
    let ns = Netns::create("extra").expect("create");
    let name = ns.name().to_owned();
    // Only lo exists in a fresh namespace.
    let dev = ns.enter(|| std::fs::read_to_string("/proc/thread-self/net/dev").expect("read"));
    assert!(dev.contains("lo:") && !dev.contains("eth0"), "{dev}");
    assert!(catch_unwind(AssertUnwindSafe(|| ns.enter(|| panic!("inside")))).is_err());
    // Commands not built by this namespace are refused.
    assert!(ns.spawn(&mut Command::new("sleep")).is_err());
    let other = Netns::create("other").expect("create");
    assert!(ns.spawn(&mut other.command("true")).is_err());
    // A veth between two standalone namespaces.
    ns.veth("x0", &other, "y0").expect("veth");
    ns.ip(&["addr", "add", "192.0.2.1/24", "dev", "x0"])
        .expect("addr");
    ns.ip(&["link", "set", "x0", "up"]).expect("up");
    other
        .ip(&["addr", "add", "192.0.2.2/24", "dev", "y0"])
        .expect("addr");
    other.ip(&["link", "set", "y0", "up"]).expect("up");
    ns.wait_links_up(Duration::from_secs(3)).expect("x0 up");
    other.wait_links_up(Duration::from_secs(3)).expect("y0 up");
    assert!(ping(&ns, [192, 0, 2, 2]).is_some());
    assert_eq!(ns.run("true", &[]).expect("run"), "");
    let err = ns.run("false", &[]).expect_err("false fails").to_string();
    assert!(err.contains(&name) && err.contains("false"), "{err}");
    drop((ns, other));
    assert!(!std::path::Path::new("/run/netns").join(&name).exists());
}

#[test]
fn stale_namespaces_of_dead_processes_are_swept() {
    let mut child = Command::new("true").spawn().expect("spawn");
    let dead = child.id();
    child.wait().expect("wait");
    let name = format!("cw{dead}x0-stale");
    let status = Command::new("ip")
        .args(["netns", "add", &name])
        .status()
        .expect("ip");
    assert!(status.success());
    causeway_testbed::sweep_stale_namespaces();
    assert!(!std::path::Path::new("/run/netns").join(&name).exists());
}
