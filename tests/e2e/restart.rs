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

fn our_routes(ns: &str) -> String {
    ip_n(ns, &["route", "show", "proto", "201"]).unwrap_or_default()
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
