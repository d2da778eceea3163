//! Live reload: SIGHUP and edits of the config file (also the way
//! Kubernetes swaps a mounted ConfigMap) apply a new config without
//! disturbing peers that did not change; a bad config is refused.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::common::*;

/// Site a's config with only the peers named in `keep` (of the mesh a, b, c).
fn write_a_with(mesh: &Mesh, keep: &[&str], into: &Path) {
    let names = ["a", "b", "c"];
    let mut peers = String::new();
    for k in 1..3 {
        if keep.contains(&names[k]) {
            let site = &mesh.lab.sites()[k];
            peers += &peer_toml(
                names[k],
                &mesh.files[k].public_key,
                &[["10.0.0.0/16", "10.1.0.0/16", "10.2.0.0/16"][k]],
                Some(SocketAddr::new(site.wan_addr, PORT)),
            );
        }
    }
    let written = mesh.files[0].write_config("a", &["10.0.0.0/16"], &peers);
    if written != into {
        std::fs::rename(&written, into).expect("move config");
    }
}

fn peer_names(d: &Daemon) -> Vec<String> {
    d.status().peers.into_iter().map(|p| p.name).collect()
}

fn wait_for(what: &str, d: &Daemon, cond: impl Fn() -> bool) {
    assert!(
        wait_until(Duration::from_secs(10), cond),
        "timed out waiting for {what}:\n{}",
        d.log_text()
    );
}

fn three_sites() -> Mesh {
    Mesh::build(
        &[
            SiteDef::new("a", &["10.0.0.0/16"]),
            SiteDef::new("b", &["10.1.0.0/16"]),
            SiteDef::new("c", &["10.2.0.0/16"]),
        ],
        false,
    )
}

#[test]
fn adding_and_removing_a_peer_leaves_the_others_undisturbed() {
    let mesh = three_sites();
    let (a, b, c) = (
        &mesh.lab.sites()[0],
        &mesh.lab.sites()[1],
        &mesh.lab.sites()[2],
    );
    let (pod_a, pod_b, pod_c) = (&a.pods[0], &b.pods[0], &c.pods[0]);
    assert_ping(&pod_a.ns, pod_b.addr.into());
    let daemon = mesh.daemon(0);
    let config = mesh.configs[0].clone();

    // A transfer to b runs for the whole test.
    let _server = pod_b
        .ns
        .spawn(
            pod_b
                .ns
                .command("iperf3")
                .args(["-s", "-1", "-B", &pod_b.addr.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .expect("iperf3 -s");
    std::thread::sleep(Duration::from_millis(300));
    let mut client = pod_a
        .ns
        .spawn(
            pod_a
                .ns
                .command("iperf3")
                .args([
                    "-c",
                    &pod_b.addr.to_string(),
                    "-t",
                    "6",
                    "-b",
                    "100M",
                    "--json",
                ])
                .stdout(Stdio::piped()),
        )
        .expect("iperf3 -c");
    std::thread::sleep(Duration::from_secs(1));
    let b_before = daemon
        .status()
        .peers
        .into_iter()
        .find(|p| p.name == "b")
        .expect("b");

    // Remove c, then add it back.
    write_a_with(&mesh, &["b"], &config);
    wait_for("c removed", daemon, || peer_names(daemon) == ["b"]);
    assert!(
        ip_routes(&a.gateway).contains("10.1.0.0/16")
            && !ip_routes(&a.gateway).contains("10.2.0.0/16")
    );
    write_a_with(&mesh, &["b", "c"], &config);
    wait_for("c added", daemon, || peer_names(daemon) == ["b", "c"]);
    assert_ping(&pod_a.ns, pod_c.addr.into());

    let status = client
        .wait_timeout(Duration::from_secs(30))
        .expect("wait")
        .expect("iperf3 ended");
    let mut json = String::new();
    std::io::Read::read_to_string(client.child().stdout.as_mut().expect("stdout"), &mut json)
        .expect("read");
    assert!(
        status.success(),
        "the transfer to b broke during the reloads: {json}"
    );
    // b is the same peer object: its counters went on, its session stayed.
    let b_after = daemon
        .status()
        .peers
        .into_iter()
        .find(|p| p.name == "b")
        .expect("b");
    assert!(
        b_after.tx_bytes > b_before.tx_bytes,
        "b's counters were reset: {b_before:?} -> {b_after:?}"
    );
    assert!(
        b_after.last_handshake_secs >= b_before.last_handshake_secs,
        "b handshook again: {b_before:?} -> {b_after:?}"
    );
    assert!(daemon.log_text().contains("config reloaded"));
}

fn ip_routes(ns: &causeway_testbed::Netns) -> String {
    ns.ip(&["route", "show", "proto", "201"])
        .unwrap_or_default()
}

#[test]
fn a_bad_or_unappliable_config_is_refused_and_the_running_one_stays() {
    let mut mesh = Mesh::new();
    let (pod_a, addr_b) = (
        &mesh.lab.sites()[0].pods[0].ns,
        mesh.lab.sites()[1].pods[0].addr,
    );
    assert_ping(pod_a, addr_b.into());
    let config = mesh.configs[0].clone();
    let good = std::fs::read_to_string(&config).expect("read");

    std::fs::write(
        &config,
        good.replace("cidrs = [\"10.1.0.0/16\"]", "cidrs = [\"10.1.0.0/33\"]"),
    )
    .expect("write");
    wait_for("refusal", mesh.daemon(0), || {
        mesh.daemon(0).log_text().contains("config reload refused")
    });
    assert!(
        mesh.daemon(0).log_text().contains("10.1.0.0/33"),
        "the reason is not given"
    );
    assert_ping(pod_a, addr_b.into());

    std::fs::write(
        &config,
        good.replace("listen_port = 51820", "listen_port = 51821"),
    )
    .expect("write");
    wait_for("restart needed", mesh.daemon(0), || {
        mesh.daemon(0).log_text().contains("needs a restart")
    });
    assert_eq!(mesh.daemon(0).status().listen_port, 51820);
    assert_ping(pod_a, addr_b.into());

    // SIGHUP reloads on demand.
    std::fs::write(&config, &good).expect("write");
    let reloads = |d: &Daemon| d.log_text().matches("config reloaded").count();
    wait_for("reload of the good file", mesh.daemon(0), || {
        reloads(mesh.daemon(0)) >= 1
    });
    let before = reloads(mesh.daemon(0));
    mesh.daemons[0]
        .as_mut()
        .expect("daemon")
        .child
        .signal(libc::SIGHUP)
        .expect("SIGHUP");
    wait_for("reload on SIGHUP", mesh.daemon(0), || {
        reloads(mesh.daemon(0)) > before
    });
    assert_ping(pod_a, addr_b.into());
}

/// A setting given on the command line (`--metrics-listen`) wins over the
/// file at every reload too; it is not taken for a change that needs a
/// restart.
#[test]
fn a_command_line_override_does_not_block_reloads() {
    let mut mesh = Mesh::new();
    mesh.restart_with(0, &["--metrics-listen=127.0.0.1:9469"]);
    let config = mesh.configs[0].clone();
    let text = std::fs::read_to_string(&config).expect("read");
    std::fs::write(&config, text + "# touched\n").expect("write");
    let d = mesh.daemon(0);
    wait_for("a reload", d, || {
        let log = d.log_text();
        log.contains("config reloaded") || log.contains("config reload refused")
    });
    assert!(
        !d.log_text().contains("config reload refused"),
        "{}",
        d.log_text()
    );
    let (pod_a, _) = mesh.pod(0);
    let (_, addr_b) = mesh.pod(1);
    assert_ping(pod_a, addr_b.into());
}

#[test]
fn a_configmap_symlink_swap_is_picked_up() {
    let mut mesh = three_sites();
    // Lay the config out as the kubelet mounts a ConfigMap:
    //   causeway.toml -> ..data/causeway.toml, ..data -> ..<timestamp>/
    let dir = mesh.files[0].path("configmap");
    std::fs::create_dir_all(dir.join("..2026_11_28_v1")).expect("mkdir");
    std::fs::copy(&mesh.configs[0], dir.join("..2026_11_28_v1/causeway.toml")).expect("copy");
    std::os::unix::fs::symlink("..2026_11_28_v1", dir.join("..data")).expect("symlink");
    std::os::unix::fs::symlink("..data/causeway.toml", dir.join("causeway.toml")).expect("symlink");
    mesh.daemons[0].take().expect("daemon").stop();
    let daemon = Daemon::start(
        &mesh.lab.sites()[0].gateway,
        &mesh.files[0],
        &dir.join("causeway.toml"),
    );
    assert_eq!(peer_names(&daemon), ["b", "c"]);

    // The kubelet writes the new version beside the old one and swaps ..data.
    std::fs::create_dir_all(dir.join("..2026_11_28_v2")).expect("mkdir");
    write_a_with(&mesh, &["c"], &dir.join("..2026_11_28_v2/causeway.toml"));
    std::os::unix::fs::symlink("..2026_11_28_v2", dir.join("..data_tmp")).expect("symlink");
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).expect("swap");
    std::fs::remove_dir_all(dir.join("..2026_11_28_v1")).expect("old version");
    wait_for("the swapped config", &daemon, || {
        peer_names(&daemon) == ["c"]
    });
    assert_ping(
        &mesh.lab.sites()[0].pods[0].ns,
        mesh.lab.sites()[2].pods[0].addr.into(),
    );
    daemon.stop();
}
