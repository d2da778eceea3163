//! Restarts: a clean restart mid-stream and a `kill -9` followed by a
//! start that adopts and reconciles what the crashed run left behind.

use std::time::{Duration, Instant};

use crate::common::*;

/// `ip -n NS args…`, for namespaces we hold only by name.
fn ip_n(ns: &str, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("ip")
        .arg("-n")
        .arg(ns)
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Our routes through the interface (not the backstops).
fn our_routes(ns: &str) -> String {
    ip_n(ns, &["route", "show", "proto", "201", "type", "unicast"]).unwrap_or_default()
}

/// Our backstop routes.
fn backstops(ns: &str) -> String {
    ip_n(ns, &["route", "show", "proto", "201", "type", "blackhole"]).unwrap_or_default()
}

#[test]
fn restart_mid_stream_keeps_the_tcp_connection() {
    let mut j = Joined::new();
    let j = &mut j;
    let pod_a = &j.lab.sites()[0].pods[0].ns;
    let (pod_b, addr_b) = (&j.lab.sites()[1].pods[0].ns, j.lab.sites()[1].pods[0].addr);
    assert_ping(pod_a, addr_b.into());
    let b_pid = j.daemon(1).child.pid();

    let _server = pod_b
        .spawn(
            pod_b
                .command("iperf3")
                .args(["-s", "-1", "-B", &addr_b.to_string()])
                .stdout(std::process::Stdio::null()),
        )
        .expect("iperf3 -s");
    std::thread::sleep(Duration::from_millis(300));
    let mut client = pod_a
        .spawn(
            pod_a
                .command("iperf3")
                .args(["-c", &addr_b.to_string(), "-t", "8", "-b", "50M", "--json"])
                .stdout(std::process::Stdio::piped()),
        )
        .expect("iperf3 -c");
    std::thread::sleep(Duration::from_secs(2));

    // Clean stop removes the interface and every route it made...
    j.daemons[0].take().expect("daemon a").stop();
    let gw_a = j.lab.sites()[0].gateway.name().to_owned();
    assert!(
        ip_n(&gw_a, &["link", "show", "causeway0"]).is_err(),
        "interface left after clean stop"
    );
    assert_eq!(our_routes(&gw_a), "", "routes left after clean stop");
    assert!(backstops(&gw_a).contains("10.1.0.0/16"), "no backstop");
    // ...and a new run picks the stream up again.
    j.daemons[0] = Some(Daemon::start(
        &j.lab.sites()[0].gateway,
        &j.files[0],
        &j.configs[0],
    ));

    let status = client
        .wait_timeout(Duration::from_secs(30))
        .expect("wait")
        .expect("iperf3 finished");
    let mut json = String::new();
    std::io::Read::read_to_string(client.child().stdout.as_mut().expect("stdout"), &mut json)
        .expect("read");
    assert!(status.success(), "iperf3 failed across the restart: {json}");
    let report: serde_json::Value = serde_json::from_str(&json).expect("iperf3 json");
    let received = report["end"]["sum_received"]["bytes"]
        .as_f64()
        .unwrap_or(0.0);
    assert!(received > 1e6, "stream carried only {received} bytes");

    assert_eq!(j.daemon(1).child.pid(), b_pid, "site b was restarted");
    assert_ping(pod_a, addr_b.into());
}

#[test]
fn kill_9_then_start_reconciles_and_works() {
    let mut j = Joined::new();
    let j = &mut j;
    let pod_a = &j.lab.sites()[0].pods[0].ns;
    let addr_b = j.lab.sites()[1].pods[0].addr;
    assert_ping(pod_a, addr_b.into());

    j.daemons[0]
        .take()
        .expect("daemon a")
        .child
        .kill9()
        .expect("kill -9");
    let gw_a = j.lab.sites()[0].gateway.name().to_owned();
    // The crashed run leaves its (persistent, carrier-less) interface and
    // routes: traffic for the peer is dropped, never leaked to the default
    // route.
    assert!(
        ip_n(&gw_a, &["link", "show", "causeway0"]).is_ok(),
        "interface vanished with the crash"
    );
    assert!(
        our_routes(&gw_a).contains("10.1.0.0/16"),
        "routes vanished with the crash"
    );
    assert!(
        pod_a
            .ping(addr_b.into(), Duration::from_millis(500))
            .expect("ping")
            .is_none()
    );
    // A stale route from an older config, to be reconciled away.
    ip_n(
        &gw_a,
        &[
            "route",
            "add",
            "10.77.0.0/16",
            "dev",
            "causeway0",
            "proto",
            "201",
        ],
    )
    .expect("stale route");

    let t = Instant::now();
    j.daemons[0] = Some(Daemon::start(
        &j.lab.sites()[0].gateway,
        &j.files[0],
        &j.configs[0],
    ));
    assert_ping(pod_a, addr_b.into());
    eprintln!("back up {:?} after start", t.elapsed());
    let routes = our_routes(&gw_a);
    assert!(
        !routes.contains("10.77.0.0/16"),
        "stale route kept: {routes}"
    );
    assert!(routes.contains("10.1.0.0/16"), "route missing: {routes}");

    j.daemons[0].take().expect("daemon a").stop();
    assert!(
        ip_n(&gw_a, &["link", "show", "causeway0"]).is_err(),
        "interface left after clean stop"
    );
    assert_eq!(our_routes(&gw_a), "");
}

/// Counters on the gateway: `sent`, packets from its pods to site b's pods
/// (what the pod tried); `clear`, those that left by the underlay in clear.
const CLEAR_NFT: &str = r#"
table inet causeway_clear {
    counter sent {}
    counter clear {}
    chain in {
        type filter hook prerouting priority 0; policy accept;
        iifname "pod0" ip daddr 10.1.0.0/16 counter name "sent"
    }
    chain out {
        type filter hook postrouting priority 0; policy accept;
        oifname "wan0" ip daddr 10.1.0.0/16 counter name "clear"
    }
}
"#;

fn cleartext_packets(gw: &causeway_testbed::Netns) -> u64 {
    nft_counter(gw, "clear")
}

/// Asserts the pod keeps sending to site b across `window`, and returns
/// how many of its packets left in clear meanwhile.
fn leaked_while_sending(gw: &causeway_testbed::Netns, window: Duration) -> u64 {
    let sent = nft_counter(gw, "sent");
    std::thread::sleep(window);
    assert!(
        nft_counter(gw, "sent") >= sent + 10,
        "the pod stopped sending"
    );
    cleartext_packets(gw)
}

fn nft_counter(gw: &causeway_testbed::Netns, name: &str) -> u64 {
    let out = gw
        .run("nft", &["list", "counter", "inet", "causeway_clear", name])
        .expect("nft list counter");
    out.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected nft output {out:?}"))
}

/// No stop, crash or restart lets a pod's traffic to a peer leave the
/// gateway in clear: the backstop routes hold while no daemon runs, also
/// with `ignore_routes_with_linkdown` (which makes the kernel skip the
/// carrier-less interface's routes after a crash). Only `causeway down
/// --purge` lets it go, and the counter sees that.
#[test]
fn no_cleartext_across_stop_crash_and_restart() {
    let mut j = Joined::new();
    let j = &mut j;
    let gw = j.lab.sites()[0].gateway.name().to_owned();
    let gateway = &j.lab.sites()[0].gateway;
    let pod_a = &j.lab.sites()[0].pods[0].ns;
    let addr_b = j.lab.sites()[1].pods[0].addr;
    gateway
        .run_with_input("nft", &["-f", "-"], CLEAR_NFT)
        .expect("nft");
    assert_ping(pod_a, addr_b.into());
    // The pod sends to the remote pod throughout, 50 datagrams a second
    // (the socket belongs to the pod's namespace, whichever thread sends).
    let socket = pod_a
        .enter(|| std::net::UdpSocket::bind("0.0.0.0:0"))
        .expect("udp socket in the pod");
    let sending = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sender = {
        let sending = std::sync::Arc::clone(&sending);
        std::thread::spawn(move || {
            while sending.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = socket.send_to(b"secret", (addr_b, 9));
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    struct StopOnDrop(std::sync::Arc<std::sync::atomic::AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(false, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let _stop = StopOnDrop(sending);
    let window = Duration::from_millis(1500);

    // (a) clean stop.
    j.daemons[0].take().expect("daemon a").stop();
    assert_eq!(
        leaked_while_sending(gateway, window),
        0,
        "leak after a clean stop"
    );

    // (c) start again: traffic flows, through the tunnel only.
    j.daemons[0] = Some(Daemon::start(gateway, &j.files[0], &j.configs[0]));
    assert_ping(pod_a, addr_b.into());
    assert_eq!(cleartext_packets(gateway), 0, "leak across the restart");

    // (b) kill -9 with ignore_routes_with_linkdown: the interface's route
    // is skipped once the interface has no carrier.
    gateway
        .sysctls(&[
            ("net.ipv4.conf.all.ignore_routes_with_linkdown", "1"),
            ("net.ipv4.conf.default.ignore_routes_with_linkdown", "1"),
        ])
        .expect("sysctl");
    j.daemons[0]
        .take()
        .expect("daemon a")
        .child
        .kill9()
        .expect("kill -9");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !our_routes(&gw).contains("linkdown") {
        assert!(
            Instant::now() < deadline,
            "route never linkdown: {}",
            our_routes(&gw)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        leaked_while_sending(gateway, window),
        0,
        "leak after kill -9"
    );

    // (c) and a restart after the crash.
    j.daemons[0] = Some(Daemon::start(gateway, &j.files[0], &j.configs[0]));
    assert_ping(pod_a, addr_b.into());
    j.daemons[0].take().expect("daemon a").stop();
    assert_eq!(
        leaked_while_sending(gateway, window),
        0,
        "leak after the last stop"
    );

    // `causeway down` keeps the backstops; `--purge` removes them, and
    // only then does the (still pinging) pod's traffic leave in clear:
    // the counter does see leaks.
    let down = |args: &[&str]| {
        let out = gateway
            .command(causeway_bin())
            .arg("down")
            .args(args)
            .arg("--config")
            .arg(&j.configs[0])
            .output()
            .expect("causeway down");
        assert!(out.status.success(), "causeway down {args:?}: {out:?}");
    };
    down(&[]);
    assert!(backstops(&gw).contains("10.1.0.0/16"));
    down(&["--purge"]);
    assert_eq!(backstops(&gw), "");
    assert_eq!(
        ip_n(&gw, &["route", "show", "proto", "201"]),
        Ok(String::new())
    );
    assert!(
        leaked_while_sending(gateway, window) > 0,
        "the leak counter sees nothing"
    );
    drop(_stop);
    sender.join().expect("sender");
}
