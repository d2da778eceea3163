//! The netlink crate against the real kernel, each test in a network
//! namespace of its own (made with unshare on the test's thread), so nothing
//! touches the host. Needs root.

use std::process::Command;

use causeway_netlink::{Netlink, ROUTE_PROTOCOL, Tun};
use ipnet::IpNet;

/// Runs `f` on a new thread inside a fresh network namespace that vanishes
/// when the thread ends.
fn in_fresh_netns<F: FnOnce() + Send>(f: F) {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare only affects this thread's network namespace.
            assert_eq!(
                unsafe { libc::unshare(libc::CLONE_NEWNET) },
                0,
                "unshare(CLONE_NEWNET) needs root"
            );
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    });
}

fn ip(args: &[&str]) -> String {
    // The child inherits the calling thread's namespace (fork happens on it).
    let out = Command::new("ip").args(args).output().expect("ip");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|s| s.parse().expect("cidr")).collect()
}

#[test]
fn tun_routes_are_idempotent_and_reconciled() {
    in_fresh_netns(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let nl = Netlink::connect().expect("netlink");
            assert!(nl.link_by_name("cwtest0").await.expect("get").is_none());
            let tun = Tun::create_or_attach("cwtest0").expect("tun");
            let link = nl
                .link_by_name("cwtest0")
                .await
                .expect("get")
                .expect("link exists");
            assert_eq!(link.kind, "tun");
            nl.ensure_link_up(&link, 1420).await.expect("up");
            nl.ensure_link_up(&link, 1420).await.expect("up again");
            let link = nl
                .link_by_name("cwtest0")
                .await
                .expect("get")
                .expect("link");
            assert!(link.up && link.mtu == 1420, "{link:?}");
            // Offloaded packets never carry more segments than a read can split.
            assert_eq!(link.gso_max_segs as usize, causeway_netlink::MAX_SEGMENTS);

            let wanted = nets(&["10.1.0.0/16", "10.2.0.0/24", "fd00:20::/64"]);
            let changes = nl
                .reconcile_routes(&link, &wanted)
                .await
                .expect("reconcile");
            assert_eq!(changes.added, wanted);
            let again = nl
                .reconcile_routes(&link, &wanted)
                .await
                .expect("reconcile again");
            assert!(
                again.added.is_empty() && again.removed.is_empty(),
                "{again:?}"
            );

            // Somebody else's route on our interface is left alone; a stale
            // one of ours is removed.
            ip(&["route", "add", "10.9.0.0/16", "dev", "cwtest0"]);
            ip(&[
                "route",
                "add",
                "10.77.0.0/16",
                "dev",
                "cwtest0",
                "proto",
                &ROUTE_PROTOCOL.to_string(),
            ]);
            let changes = nl
                .reconcile_routes(&link, &wanted[..2])
                .await
                .expect("reconcile");
            assert_eq!(changes.removed, nets(&["10.77.0.0/16", "fd00:20::/64"]));
            let table = ip(&["route"]);
            assert!(
                table.contains("10.9.0.0/16") && !table.contains("10.77.0.0/16"),
                "{table}"
            );

            // Attach again to the persistent device while it has no owner.
            drop(tun);
            let tun = Tun::create_or_attach("cwtest0").expect("re-attach");
            nl.remove_route(&link, wanted[0]).await.expect("remove");
            nl.remove_route(&link, wanted[0])
                .await
                .expect("remove twice");
            tun.set_persistent(false).expect("persist off");
            nl.delete_link(&link).await.expect("delete");
            nl.delete_link(&link).await.expect("delete twice");
            assert!(nl.link_by_name("cwtest0").await.expect("get").is_none());
        });
    });
}

#[test]
fn a_non_tun_interface_is_not_taken_over() {
    in_fresh_netns(|| {
        let out = ip(&[
            "link", "add", "cwveth0", "type", "veth", "peer", "name", "cwveth1",
        ]);
        assert!(
            ip(&["link", "show", "cwveth0"]).contains("cwveth0"),
            "no veth: {out}"
        );
        let err = Tun::create_or_attach("cwveth0").expect_err("dummy is not a tun");
        assert!(err.to_string().contains("cwveth0"), "{err}");
    });
}

#[test]
fn backstops_are_idempotent_reconciled_and_drop_when_the_tun_route_is_ignored() {
    in_fresh_netns(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let nl = Netlink::connect().expect("netlink");
            // A default route, as on a gateway: what a leak would follow.
            for args in [
                &["link", "add", "up0", "type", "veth", "peer", "name", "up1"][..],
                &["link", "set", "up0", "up"],
                &["link", "set", "up1", "up"],
                &["addr", "add", "192.0.2.1/24", "dev", "up0"],
                &["route", "add", "default", "via", "192.0.2.254"],
            ] {
                assert_eq!(ip(args), "", "ip {args:?}");
            }
            assert!(ip(&["route", "get", "10.1.2.3"]).contains("via 192.0.2.254"));
            // Somebody else's blackhole is never touched.
            ip(&["route", "add", "blackhole", "10.9.0.0/16"]);

            let wanted = nets(&["10.1.0.0/16", "fd00:20::/64"]);
            let changes = nl.reconcile_backstops(&wanted).await.expect("reconcile");
            assert_eq!(changes.added, wanted);
            let again = nl.reconcile_backstops(&wanted).await.expect("again");
            assert!(
                again.added.is_empty() && again.removed.is_empty(),
                "{again:?}"
            );
            let shown = ip(&["route", "show", "proto", &ROUTE_PROTOCOL.to_string()]);
            assert!(
                shown.contains("blackhole 10.1.0.0/16")
                    && shown.contains(&format!("metric {}", causeway_netlink::BACKSTOP_METRIC)),
                "{shown}"
            );
            // Without the interface, the backstop answers, not the default route.
            // (a lookup that hits a blackhole route fails with EINVAL).
            let get = ip(&["route", "get", "10.1.2.3"]);
            assert!(
                !get.contains("via 192.0.2.254") && get.contains("Invalid argument"),
                "{get}"
            );

            // With the TUN route, the TUN route wins...
            let tun = Tun::create_or_attach("cwtest2").expect("tun");
            let link = nl
                .link_by_name("cwtest2")
                .await
                .expect("get")
                .expect("link");
            nl.ensure_link_up(&link, 1420).await.expect("up");
            nl.reconcile_routes(&link, &wanted).await.expect("routes");
            let get = ip(&["route", "get", "10.1.2.3"]);
            assert!(get.contains("dev cwtest2"), "{get}");
            // ...and the interface's own reconcile does not see the backstops.
            assert_eq!(nl.owned_routes(&link).await.expect("owned"), wanted);

            // A crash: the (persistent) interface stays without carrier, and
            // with ignore_routes_with_linkdown its route is skipped: the
            // backstop drops the packet instead of the default route taking it.
            let sysctl = Command::new("sysctl")
                .args(["-qw", "net.ipv4.conf.all.ignore_routes_with_linkdown=1"])
                .status()
                .expect("sysctl");
            assert!(sysctl.success());
            drop(tun);
            // (the kernel marks the route linkdown within a second or so)
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while !ip(&["route", "show", "dev", "cwtest2"]).contains("linkdown") {
                assert!(std::time::Instant::now() < deadline, "carrier never went");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let get = ip(&["route", "get", "10.1.2.3"]);
            assert!(
                !get.contains("via 192.0.2.254") && get.contains("Invalid argument"),
                "{get}"
            );
            // Without the backstop, that packet would have left by the default route.
            nl.remove_backstop("10.1.0.0/16".parse().expect("cidr"))
                .await
                .expect("remove");
            let get = ip(&["route", "get", "10.1.2.3"]);
            assert!(get.contains("via 192.0.2.254"), "{get}");
            nl.ensure_backstop("10.1.0.0/16".parse().expect("cidr"))
                .await
                .expect("add");

            // A stale backstop from an older config goes; others' routes stay.
            let changes = nl
                .reconcile_backstops(&nets(&["10.1.0.0/16"]))
                .await
                .expect("shrink");
            assert_eq!(changes.removed, nets(&["fd00:20::/64"]));
            assert!(ip(&["route", "show"]).contains("blackhole 10.9.0.0/16"));
            let purged = nl.reconcile_backstops(&[]).await.expect("purge");
            assert_eq!(purged.removed, nets(&["10.1.0.0/16"]));
            assert!(nl.backstop_routes().await.expect("list").is_empty());
            assert!(ip(&["route", "show"]).contains("blackhole 10.9.0.0/16"));
        });
    });
}
