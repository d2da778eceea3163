//! The node agent's I/O: watches, routes, VXLAN, nftables, metrics.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use causeway_netlink::{
    GATEWAY_VXLAN_MAC, Link, Netlink, NextHop, VXLAN_NEXT_HOP_V4, VXLAN_NEXT_HOP_V6, VxlanSpec,
};
use ipnet::IpNet;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::config::NodeConfig;
use super::nft;
use super::plan::{self, GatewayState, Local, Path, Plan};
use crate::cluster::{self, ClusterSecret, Heard, VXLAN_MTU};

/// How often the gateways' names are resolved again, and the routes
/// repaired (re-installed if somebody removed them).
const REFRESH: Duration = Duration::from_secs(30);
/// How often the masquerade counter is read.
const COUNTER_POLL: Duration = Duration::from_secs(1);
/// At most one masquerade warning per this long.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The node agent's counters and state, for `/metrics` and the logs.
#[derive(Debug, Default)]
pub struct NodeStats {
    /// Packets to a view that left masqueraded (source outside the pod CIDRs).
    pub masqueraded: AtomicU64,
    /// Host-originated packets to a view dropped for lack of a source
    /// address inside the pod CIDRs.
    pub host_dropped: AtomicU64,
    /// Announcements received.
    pub announcements: AtomicU64,
    /// Failed reconciliations (routes, VXLAN or nftables).
    pub reconcile_errors: AtomicU64,
    /// Node routes installed now.
    pub routes: AtomicU64,
    /// Whether an active gateway has been followed (for `/readyz`).
    pub ready: AtomicBool,
    /// The gateways, as last seen.
    pub gateways: Mutex<GatewaysSeen>,
}

/// What the node agent knows of the gateways, for `/metrics`.
#[derive(Debug, Default)]
pub struct GatewaysSeen {
    /// The gateway followed: its address, site and term.
    pub following: Option<(SocketAddr, String, u64)>,
    /// Every gateway address, and whether its connection is up.
    pub addresses: Vec<(SocketAddr, bool)>,
}

/// What the agent last put on the node.
#[derive(Default)]
struct Applied {
    plan: Option<Plan>,
    script: Option<String>,
    /// The VXLAN device we made and its remote, vni, port.
    vxlan: Option<(Link, IpAddr, u32, u16)>,
}

/// Runs the node agent until `shutdown` completes, then removes its
/// routes, its VXLAN device and its nftables table.
pub async fn run(config: NodeConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let secret = cluster::read_secret(&config.secret_file)?;
    let netlink = Netlink::connect()?;
    let stats = Arc::new(NodeStats::default());
    let metrics = match config.metrics_listen {
        Some(addr) => Some(
            serve_metrics(addr, Arc::clone(&stats))
                .await
                .with_context(|| format!("metrics_listen {addr}"))?,
        ),
        None => None,
    };
    let (tx, mut rx) = mpsc::channel::<Heard>(256);
    let mut watchers: BTreeMap<SocketAddr, JoinHandle<()>> = BTreeMap::new();
    let mut gateways: BTreeMap<SocketAddr, GatewayState> = BTreeMap::new();
    resolve(&config, &secret, &tx, &mut watchers, &mut gateways).await;
    let mut applied = Applied::default();
    let mut refresh = tokio::time::interval(REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    refresh.tick().await;
    let mut counters = tokio::time::interval(COUNTER_POLL);
    counters.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_counts = (0u64, 0u64);
    let mut last_warning: Option<Instant> = None;
    crate::notify::notify("READY=1");
    info!(gateways = ?config.gateways, "node agent is up");
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(heard) = rx.recv() => {
                match heard {
                    Heard::Announcement(addr, a) => {
                        stats.announcements.fetch_add(1, Ordering::Relaxed);
                        let g = gateways.entry(addr).or_default();
                        g.announcement = Some(a);
                        g.reachable = true;
                    }
                    Heard::Lost(addr, why) => {
                        let g = gateways.entry(addr).or_default();
                        if g.reachable {
                            warn!(gateway = %addr, "lost the gateway: {why}");
                        }
                        g.reachable = false;
                    }
                }
                // Take every other report queued already before acting.
                while let Ok(more) = rx.try_recv() {
                    match more {
                        Heard::Announcement(addr, a) => {
                            stats.announcements.fetch_add(1, Ordering::Relaxed);
                            let g = gateways.entry(addr).or_default();
                            g.announcement = Some(a);
                            g.reachable = true;
                        }
                        Heard::Lost(addr, _) => gateways.entry(addr).or_default().reachable = false,
                    }
                }
                reconcile(&config, &netlink, &gateways, &mut applied, &stats, false).await;
            }
            _ = refresh.tick() => {
                resolve(&config, &secret, &tx, &mut watchers, &mut gateways).await;
                reconcile(&config, &netlink, &gateways, &mut applied, &stats, true).await;
            }
            _ = counters.tick() => {
                read_counters(&stats, &mut last_counts, &mut last_warning).await;
            }
        }
    }
    info!("node agent stopping: removing its routes, VXLAN device and nftables table");
    crate::notify::notify("STOPPING=1");
    for (_, task) in watchers {
        task.abort();
    }
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    teardown(&netlink, &config.vxlan_interface).await
}

/// Resolves the configured gateway endpoints and starts a watch for each
/// new address; stops watching addresses no name resolves to any more.
async fn resolve(
    config: &NodeConfig,
    secret: &ClusterSecret,
    tx: &mpsc::Sender<Heard>,
    watchers: &mut BTreeMap<SocketAddr, JoinHandle<()>>,
    gateways: &mut BTreeMap<SocketAddr, GatewayState>,
) {
    let mut found = Vec::new();
    let mut failed = false;
    for spec in &config.gateways {
        match tokio::net::lookup_host(spec.as_str()).await {
            Ok(addrs) => found.extend(addrs),
            Err(e) => {
                failed = true;
                warn!(gateway = spec, "cannot resolve: {e}");
            }
        }
    }
    for addr in &found {
        if !watchers.contains_key(addr) {
            info!(gateway = %addr, "watching gateway");
            let task = tokio::spawn(cluster::watch(*addr, secret.clone(), tx.clone()));
            watchers.insert(*addr, task);
        }
    }
    // A name that failed to resolve keeps what it had.
    if !failed {
        watchers.retain(|addr, task| {
            let keep = found.contains(addr);
            if !keep {
                info!(gateway = %addr, "no longer a gateway address");
                task.abort();
                gateways.remove(addr);
            }
            keep
        });
    }
}

/// Puts the node into the state the active gateway's announcement asks
/// for. With no active gateway known, nothing changes: the last routes
/// stay (see docs/deploy.md).
async fn reconcile(
    config: &NodeConfig,
    netlink: &Netlink,
    gateways: &BTreeMap<SocketAddr, GatewayState>,
    applied: &mut Applied,
    stats: &NodeStats,
    repair: bool,
) {
    if let Ok(mut g) = stats.gateways.lock() {
        g.addresses = gateways.iter().map(|(a, s)| (*a, s.reachable)).collect();
    }
    let Some((at, announcement)) = plan::active(gateways) else {
        if applied.plan.is_some() {
            warn!("no active gateway answers: keeping the last routes");
        }
        return;
    };
    let addresses = match netlink.addresses().await {
        Ok(a) => a.into_iter().map(|(_, net)| net).collect::<Vec<IpNet>>(),
        Err(e) => {
            warn!("listing this node's addresses: {e}");
            stats.reconcile_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let wanted = plan::plan(
        at,
        announcement,
        Local {
            addresses: &addresses,
            encapsulation: config.encapsulation,
            snat_v4: config.host_snat_v4,
            snat_v6: config.host_snat_v6,
        },
    );
    if !repair && applied.plan.as_ref() == Some(&wanted) {
        return;
    }
    if applied.plan.as_ref() != Some(&wanted) {
        info!(
            gateway = %at, site = wanted.site, term = announcement.term, views = ?wanted.views,
            path = ?wanted.path, snat_v4 = ?wanted.snat_v4, snat_v6 = ?wanted.snat_v6,
            "following the active gateway"
        );
    }
    match apply(config, netlink, &wanted, applied).await {
        Ok(()) => {
            stats.routes.store(
                if wanted.path == Path::Local {
                    0
                } else {
                    wanted.views.len() as u64
                },
                Ordering::Relaxed,
            );
            stats.ready.store(true, Ordering::Release);
            if let Ok(mut g) = stats.gateways.lock() {
                g.following = Some((at, wanted.site.clone(), announcement.term));
            }
            applied.plan = Some(wanted);
        }
        Err(e) => {
            stats.reconcile_errors.fetch_add(1, Ordering::Relaxed);
            warn!("applying the gateway's announcement: {e:#}");
            // Try again in full at the next announcement or refresh.
            applied.plan = None;
        }
    }
}

async fn apply(
    config: &NodeConfig,
    netlink: &Netlink,
    plan: &Plan,
    applied: &mut Applied,
) -> anyhow::Result<()> {
    let routes: Vec<(IpNet, NextHop)> = match plan.path {
        Path::Local => {
            remove_vxlan(netlink, &config.vxlan_interface, applied).await?;
            Vec::new()
        }
        Path::Direct(gateway) => {
            remove_vxlan(netlink, &config.vxlan_interface, applied).await?;
            plan.views
                .iter()
                .filter(|v| {
                    // An IPv6 route cannot go via an IPv4 address here.
                    let ok = !(matches!(v, IpNet::V6(_)) && gateway.is_ipv4());
                    if !ok {
                        warn!(view = %v, %gateway, "no IPv6 route via an IPv4 gateway address: set encapsulation = \"vxlan\" for IPv6 views");
                    }
                    ok
                })
                .map(|v| (*v, NextHop::Via(gateway)))
                .collect()
        }
        Path::Vxlan { remote, vni, port } => {
            let current = applied
                .vxlan
                .as_ref()
                .filter(|(_, r, v, p)| (*r, *v, *p) == (remote, vni, port))
                .map(|(link, ..)| link.clone());
            let link = match current {
                Some(link) => link,
                None => {
                    let link = netlink
                        .ensure_vxlan(&VxlanSpec {
                            name: config.vxlan_interface.clone(),
                            vni,
                            port,
                            remote: Some(remote),
                            mac: None,
                            mtu: VXLAN_MTU,
                        })
                        .await?;
                    applied.vxlan = Some((link.clone(), remote, vni, port));
                    link
                }
            };
            netlink
                .ensure_neighbour(&link, VXLAN_NEXT_HOP_V4.into(), GATEWAY_VXLAN_MAC)
                .await?;
            if plan.views.iter().any(|v| matches!(v, IpNet::V6(_))) {
                netlink
                    .ensure_neighbour(&link, VXLAN_NEXT_HOP_V6.into(), GATEWAY_VXLAN_MAC)
                    .await?;
            }
            plan.views
                .iter()
                .map(|v| (*v, NextHop::Vxlan(link.index)))
                .collect()
        }
    };
    let changes = netlink.reconcile_node_routes(&routes).await?;
    if !changes.added.is_empty() || !changes.removed.is_empty() {
        info!(added = ?changes.added, removed = ?changes.removed, "node routes changed");
    }
    let script = plan::nft_script(plan);
    if applied.script.as_deref() != Some(script.as_str()) {
        let s = script.clone();
        tokio::task::spawn_blocking(move || nft::apply(&s)).await??;
        applied.script = Some(script);
    }
    Ok(())
}

async fn remove_vxlan(netlink: &Netlink, name: &str, applied: &mut Applied) -> anyhow::Result<()> {
    applied.vxlan = None;
    if let Some(link) = netlink.link_by_name(name).await?
        && link.kind == "vxlan"
    {
        netlink.delete_link(&link).await?;
    }
    Ok(())
}

/// Reads the nftables counters, adds what is new to the stats, and warns
/// (at most once per [`WARN_EVERY`]) when pods' packets to a view left
/// masqueraded.
async fn read_counters(
    stats: &NodeStats,
    last: &mut (u64, u64),
    last_warning: &mut Option<Instant>,
) {
    let Ok(Ok(Some(counters))) = tokio::task::spawn_blocking(nft::counters).await else {
        return;
    };
    let masq = counters.get("masqueraded").copied();
    let dropped = counters.get("host_dropped").copied();
    // A table replaced by a new plan starts its counters at 0 again.
    let delta = |now: u64, before: u64| if now >= before { now - before } else { now };
    if let Some(now) = masq {
        let new = delta(now, last.0);
        last.0 = now;
        if new > 0 {
            stats.masqueraded.fetch_add(new, Ordering::Relaxed);
            if last_warning.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                *last_warning = Some(Instant::now());
                warn!(
                    packets = new,
                    total = stats.masqueraded.load(Ordering::Relaxed),
                    "packets from pods to the peers' views left this node masqueraded (source outside the site's pod_cidrs): the peers drop them; exempt the view CIDRs from the CNI's outgoing NAT (docs/deploy.md)"
                );
            }
        }
    }
    if let Some(now) = dropped {
        let new = delta(now, last.1);
        last.1 = now;
        stats.host_dropped.fetch_add(new, Ordering::Relaxed);
    }
}

async fn teardown(netlink: &Netlink, vxlan_interface: &str) -> anyhow::Result<()> {
    let mut result = Ok(());
    match netlink.reconcile_node_routes(&[]).await {
        Ok(changes) => info!(removed = ?changes.removed, "node routes removed"),
        Err(e) => {
            warn!("removing node routes: {e}");
            result = Err(e.into());
        }
    }
    if let Ok(Some(link)) = netlink.link_by_name(vxlan_interface).await
        && link.kind == "vxlan"
        && let Err(e) = netlink.delete_link(&link).await
    {
        warn!("{e}");
        result = Err(e.into());
    }
    match tokio::task::spawn_blocking(nft::remove).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            warn!("{e}");
            result = Err(e.into());
        }
        Err(e) => result = Err(e.into()),
    }
    result
}

/// `causeway node --down`: removes what a stopped or crashed node agent
/// left (routes with `proto 202`, its VXLAN device, its nftables table).
pub async fn down(vxlan_interface: &str) -> anyhow::Result<()> {
    let netlink = Netlink::connect()?;
    teardown(&netlink, vxlan_interface).await
}

/// `/metrics`, `/healthz`, `/readyz` over plain HTTP/1.1 (one request per
/// connection, bounded read, 2 s timeout).
async fn serve_metrics(addr: SocketAddr, stats: Arc<NodeStats>) -> std::io::Result<JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    info!(%addr, "node agent metrics");
    Ok(tokio::spawn(async move {
        let slots = Arc::new(tokio::sync::Semaphore::new(64));
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                continue;
            };
            let stats = Arc::clone(&stats);
            tokio::spawn(async move {
                // The request head, up to 2 KiB, within 2 s.
                let mut buf = [0u8; 2048];
                let mut n = 0;
                let read = tokio::time::timeout(Duration::from_secs(2), async {
                    while n < buf.len() && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf[n..]).await {
                            Ok(0) | Err(_) => break,
                            Ok(more) => n += more,
                        }
                    }
                })
                .await;
                if read.is_err() || n == 0 {
                    return;
                }
                let request = String::from_utf8_lossy(&buf[..n]);
                let path = request.split_whitespace().nth(1).unwrap_or("");
                let (status, body) = match path {
                    "/metrics" => ("200 OK", render_metrics(&stats)),
                    "/healthz" => ("200 OK", "ok\n".to_owned()),
                    "/readyz" if stats.ready.load(Ordering::Acquire) => {
                        ("200 OK", "ready\n".to_owned())
                    }
                    "/readyz" => (
                        "503 Service Unavailable",
                        "no active gateway followed yet\n".to_owned(),
                    ),
                    _ => ("404 Not Found", "not found\n".to_owned()),
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    stream.write_all(response.as_bytes()),
                )
                .await;
                drop(slot);
            });
        }
    }))
}

fn render_metrics(stats: &NodeStats) -> String {
    let mut s = String::new();
    let counter = |s: &mut String, name: &str, help: &str, v: u64| {
        let _ = write!(
            s,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
        );
    };
    counter(
        &mut s,
        "causeway_node_masqueraded_packets_total",
        "Packets to a peer view that left this node with a source outside the site's pod CIDRs (masqueraded); the peers drop them.",
        stats.masqueraded.load(Ordering::Relaxed),
    );
    counter(
        &mut s,
        "causeway_node_host_dropped_packets_total",
        "Packets this host originated to a peer view, dropped for lack of a source address inside the pod CIDRs.",
        stats.host_dropped.load(Ordering::Relaxed),
    );
    counter(
        &mut s,
        "causeway_node_announcements_total",
        "Announcements received from gateways.",
        stats.announcements.load(Ordering::Relaxed),
    );
    counter(
        &mut s,
        "causeway_node_reconcile_errors_total",
        "Failed attempts to apply an announcement (routes, VXLAN or nftables).",
        stats.reconcile_errors.load(Ordering::Relaxed),
    );
    let _ = write!(
        s,
        "# HELP causeway_node_routes Node routes installed (proto 202).\n# TYPE causeway_node_routes gauge\ncauseway_node_routes {}\n",
        stats.routes.load(Ordering::Relaxed)
    );
    if let Ok(g) = stats.gateways.lock() {
        s.push_str("# HELP causeway_node_gateway_up Whether the node agent's connection to this gateway address is up.\n# TYPE causeway_node_gateway_up gauge\n");
        for (addr, up) in &g.addresses {
            let _ = writeln!(
                s,
                "causeway_node_gateway_up{{gateway=\"{addr}\"}} {}",
                u8::from(*up)
            );
        }
        s.push_str("# HELP causeway_node_active_gateway The gateway the node routes to (value: its term).\n# TYPE causeway_node_active_gateway gauge\n");
        if let Some((addr, site, term)) = &g.following {
            let _ = writeln!(
                s,
                "causeway_node_active_gateway{{gateway=\"{addr}\",site=\"{site}\"}} {term}"
            );
        }
    }
    s
}
