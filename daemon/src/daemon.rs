//! `causeway up`: bring a site up, run until told to stop, take it down.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use causeway_netlink::{Link, Netlink, Tun};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::cluster::Announcer;
use crate::config::{Config, Failover, Source};
use crate::core::{Role, Site, SiteParams, TraversalParams};
use crate::datapath::{Ctx, Datapath, Rendezvous, UdpPort};
use crate::observe::LiveSite;

/// Runs the site described by `config` until `shutdown` completes, then
/// removes every route and the interface it created.
///
/// Nothing on the host changes before the config, the key and the UDP port
/// are known to be good. An interface and routes left by a run that crashed
/// are adopted and reconciled, not reported as conflicts.
///
/// With a `source`, its file is reloaded on SIGHUP and whenever its
/// content changes (see [`reload`]), command-line settings put over it as at
/// start.
pub async fn run(
    config: Config,
    source: Option<Source>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let site = &config.site;
    let private_key = site.private_key.secret().clone();
    let udp = UdpPort::bind(site.listen_port).with_context(|| {
        format!(
            "cannot listen on UDP port {} ([site] listen_port)",
            site.listen_port
        )
    })?;
    let listen_port = udp.local_port()?;
    let lease = Lease::resolve(&config.failover)?;

    let netlink = Netlink::connect()?;
    match netlink.link_by_name(&site.interface).await? {
        Some(link) if link.kind != "tun" => {
            bail!(causeway_netlink::Error::NotTun {
                name: link.name,
                kind: link.kind
            })
        }
        Some(_) => info!(
            interface = site.interface,
            "adopting the interface a previous run left behind"
        ),
        None => {}
    }
    let tun = Tun::create_or_attach(&site.interface)?;
    let link = match netlink.link_by_name(&site.interface).await? {
        Some(link) => link,
        None => bail!(
            "interface {} vanished right after it was created",
            site.interface
        ),
    };

    let core = Site::new(
        SiteParams {
            private_key,
            pod_cidrs: site.pod_cidrs.clone(),
            mtu: site.mtu,
            traversal: traversal_params(&config, listen_port),
            seed: rand::random(),
            role: initial_role(&config.failover),
        },
        &config.peers,
        Instant::now(),
    );
    let ctx = Arc::new(Ctx::new(core, tun, udp));

    let served = match start_cluster(&config, &netlink).await {
        Ok(cluster) => {
            let announcer = cluster.as_ref().map(|c| c.announcer().clone());
            let reloader = Reloader::new(source, config.clone(), announcer);
            let served = serve(
                &config,
                reloader,
                lease,
                &netlink,
                &link,
                &ctx,
                listen_port,
                shutdown,
            )
            .await;
            if let Some(cluster) = cluster
                && let Err(e) = cluster.stop(&netlink).await
            {
                warn!("removing the cluster VXLAN device: {e}");
            }
            served
        }
        Err(e) => Err(e),
    };
    let removed = teardown(&netlink, &link, &ctx).await;
    served.and(removed)
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    config: &Config,
    mut reloader: Reloader,
    lease: Option<Lease>,
    netlink: &Netlink,
    link: &Link,
    ctx: &Arc<Ctx>,
    listen_port: u16,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let site = &config.site;
    netlink.ensure_link_up(link, u32::from(site.mtu)).await?;
    // Backstops before the routes through the interface: from here on, peer
    // traffic is dropped rather than sent in clear whatever happens to the
    // interface (see `teardown`).
    let backstops = netlink
        .reconcile_backstops(&ctx.site.peers().all_views())
        .await
        .context("installing the backstop routes")?;
    if !backstops.removed.is_empty() {
        info!(removed = ?backstops.removed, "removed backstop routes of peers no longer configured");
    }
    // A standby removes any route through the interface a previous run
    // left (the backstops stay).
    let changes = netlink
        .reconcile_routes(link, &tun_routes(&ctx.site))
        .await?;
    if !changes.removed.is_empty() {
        info!(removed = ?changes.removed, "removed stale routes of a previous run");
    }
    announce_views(reloader.announcer.as_ref(), ctx);
    announce_role(reloader.announcer.as_ref(), ctx, None);
    let datapath = Datapath::start(Arc::clone(ctx)).context("starting the packet threads")?;
    let mut rendezvous = ctx.site.is_active().then(|| Rendezvous::start(ctx, config));
    // Who asks for another role: `causeway ctl role` (keepalived) or the
    // Lease election. `roles` lives as long as this function, so the
    // channel never closes.
    let (roles, mut role_requests) = watch::channel(ctx.site.role());
    let live = LiveSite::new(Arc::clone(datapath.ctx()), &site.name, listen_port);
    let role_control = matches!(config.failover, Failover::Keepalived).then(|| roles.clone());
    let control = crate::observe::serve_control(&site.control_socket, live.clone(), role_control)
        .await
        .with_context(|| {
            format!(
                "control socket {} ([site] control_socket)",
                site.control_socket.display()
            )
        });
    let control = match control {
        Ok(control) => control,
        Err(e) => {
            datapath.stop();
            return Err(e);
        }
    };
    let uapi = crate::observe::serve_uapi(&site.uapi_socket, live.clone())
        .await
        .with_context(|| {
            format!(
                "WireGuard UAPI socket {} ([site] uapi_socket)",
                site.uapi_socket.display()
            )
        });
    let ready = Arc::new(AtomicBool::new(false));
    let metrics = match site.metrics_listen {
        Some(addr) => crate::observe::serve_metrics(addr, live.clone(), Arc::clone(&ready))
            .await
            .context("[site] metrics_listen")
            .map(Some),
        None => Ok(None),
    };
    let (uapi, metrics) = match (uapi, metrics) {
        (Ok(uapi), Ok(metrics)) => (uapi, metrics),
        (Err(e), _) | (_, Err(e)) => {
            datapath.stop();
            return Err(e);
        }
    };
    // Interface up, routes reconciled, packet threads running, config
    // applied: /readyz says so from here on.
    ready.store(true, Ordering::Release);
    info!(
        site = site.name,
        interface = site.interface,
        listen_port,
        peers = config.peers.len(),
        role = %ctx.site.role(),
        "site is up"
    );
    crate::notify::notify("READY=1");
    let watchdog = crate::notify::watchdog_interval().map(|every| {
        let ctx = Arc::clone(ctx);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                // Only a live data path earns the ping.
                if ctx.alive() {
                    crate::notify::notify("WATCHDOG=1");
                }
            }
        })
    });
    // The Lease is sought only once this replica serves: one that failed
    // to start never holds it.
    let election = lease.map(|lease| Election::start(lease, roles.clone(), Arc::clone(ctx)));
    let lease_term = || election.as_ref().map(Election::term);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            trigger = reloader.next() => reloader.reload(trigger, netlink, link, ctx).await,
            Ok(()) = role_requests.changed() => {
                let role = *role_requests.borrow_and_update();
                take_role(role, &reloader.running, netlink, link, ctx, &mut rendezvous).await;
                announce_role(reloader.announcer.as_ref(), ctx, lease_term());
            }
        }
    }
    info!("shutting down");
    if let Some(election) = election {
        // Stop acting as active first (and tell the nodes), then give the
        // Lease back: a standby takes over within one retry period.
        take_role(
            Role::Standby,
            &reloader.running,
            netlink,
            link,
            ctx,
            &mut rendezvous,
        )
        .await;
        announce_role(reloader.announcer.as_ref(), ctx, None);
        election.release().await;
    }
    drop(roles);
    ready.store(false, Ordering::Release);
    drop(metrics);
    drop(uapi);
    crate::notify::notify("STOPPING=1");
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    drop(control);
    drop(rendezvous);
    datapath.stop();
    Ok(())
}

/// Makes this replica `role`: becoming active, it starts carrying traffic
/// at once (handshakes to every peer it can reach), then installs its
/// routes through the interface and connects to the rendezvous servers
/// (which introduce it to the other peers and relay meanwhile); becoming a
/// standby, it stops sending at once, then withdraws its routes (the
/// backstops stay, so nothing leaves in clear) and leaves the rendezvous.
async fn take_role(
    role: Role,
    config: &Config,
    netlink: &Netlink,
    link: &Link,
    ctx: &Arc<Ctx>,
    rendezvous: &mut Option<Rendezvous>,
) {
    // The core may have taken the role already (a Lease holder that could
    // not renew steps down at once, from the election's callback): the
    // rest is done either way, and is idempotent.
    let changed = ctx.site.set_role(role, &mut ctx.io());
    if !changed && (role == Role::Active) == rendezvous.is_some() {
        info!(%role, "role unchanged");
        return;
    }
    if role == Role::Standby {
        *rendezvous = None;
    }
    if let Err(e) = netlink.reconcile_routes(link, &tun_routes(&ctx.site)).await {
        warn!(%role, "routes for the new role: {e}");
    }
    if role == Role::Active && rendezvous.is_none() {
        *rendezvous = Some(Rendezvous::start(ctx, config));
    }
    warn!(%role, "gateway role changed");
}

/// How often the config file is checked for changes (a Kubernetes
/// ConfigMap update arrives as a `..data` symlink swap; reading the file
/// through its path sees it like any other edit).
const CONFIG_POLL: Duration = Duration::from_secs(2);

/// Why a reload runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// SIGHUP: reload even if the file looks unchanged.
    Signal,
    /// The file's content changed.
    FileChanged,
}

/// Live reload: watches for SIGHUP and for changes of the config file, and
/// applies a new config without disturbing what did not change.
struct Reloader {
    source: Option<Source>,
    running: Config,
    last_text: Option<String>,
    hangup: Option<tokio::signal::unix::Signal>,
    poll: tokio::time::Interval,
    announcer: Option<Announcer>,
}

impl Reloader {
    fn new(source: Option<Source>, running: Config, announcer: Option<Announcer>) -> Self {
        let path = source.as_ref().map(|s| s.path.as_path());
        let hangup = path.and_then(|_| {
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
        });
        let last_text = path.and_then(|p| std::fs::read_to_string(p).ok());
        let mut poll = tokio::time::interval(CONFIG_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Reloader {
            source,
            running,
            last_text,
            hangup,
            poll,
            announcer,
        }
    }

    /// Waits for the next reason to reload (forever without a config path).
    async fn next(&mut self) -> Trigger {
        let Some(path) = self.source.as_ref().map(|s| s.path.clone()) else {
            return std::future::pending().await;
        };
        loop {
            let hangup = async {
                match self.hangup.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = hangup => return Trigger::Signal,
                _ = self.poll.tick() => {
                    let text = std::fs::read_to_string(&path).ok();
                    if text.is_some() && text != self.last_text {
                        return Trigger::FileChanged;
                    }
                }
            }
        }
    }

    /// Loads the file again and applies it; a bad or unappliable config is
    /// refused with the reasons, and the running one stays.
    async fn reload(&mut self, trigger: Trigger, netlink: &Netlink, link: &Link, ctx: &Arc<Ctx>) {
        let Some(source) = &self.source else {
            return;
        };
        self.last_text = std::fs::read_to_string(&source.path).ok();
        info!(?trigger, file = %source.path.display(), "reloading the config");
        let new = match source.load() {
            Ok(new) => new,
            Err(errors) => {
                warn!("config reload refused, the running config stays:\n{errors}");
                return;
            }
        };
        if let Some(field) = crate::config::needs_restart(&self.running, &new) {
            warn!(
                "config reload refused: changing {field} needs a restart; the running config stays"
            );
            return;
        }
        let changes = ctx.site.update_peers(&new.peers);
        let views = ctx.site.peers().all_views();
        if let Err(e) = netlink.reconcile_backstops(&views).await {
            warn!("backstop routes after reload: {e}");
        }
        if let Err(e) = netlink.reconcile_routes(link, &tun_routes(&ctx.site)).await {
            warn!("routes after reload: {e}");
        }
        announce_views(self.announcer.as_ref(), ctx);
        let keys = new.peers.iter().map(|p| p.public_key).collect();
        crate::datapath::update_peers(ctx, keys);
        info!(
            added = ?changes.added,
            changed = ?changes.changed,
            removed = ?changes.removed,
            unchanged = changes.unchanged.len(),
            "config reloaded"
        );
        self.running = new;
    }
}

/// The routes through the interface this replica keeps: one per peer view
/// while active, none while a standby (its backstops stay).
fn tun_routes(site: &Site) -> Vec<ipnet::IpNet> {
    match site.role() {
        Role::Active => site.peers().all_views(),
        Role::Standby => Vec::new(),
    }
}

/// The role a replica starts in. (Here rather than on [`Failover`]: the
/// config layer is below the core, which defines the role.)
fn initial_role(failover: &Failover) -> Role {
    match failover {
        Failover::None => Role::Active,
        Failover::Keepalived | Failover::Kubernetes(_) => Role::Standby,
    }
}

/// What `election = "kubernetes"` runs on: the API server and the Lease,
/// resolved from the pod before anything on the host changes.
struct Lease {
    api: crate::election::ApiServer,
    params: crate::election::LeaseParams,
}

impl Lease {
    /// The in-cluster API server and the Lease parameters, with what the
    /// config leaves open taken from the pod; `None` without the election.
    fn resolve(failover: &Failover) -> anyhow::Result<Option<Lease>> {
        let Failover::Kubernetes(lease) = failover else {
            return Ok(None);
        };
        let params = crate::election::LeaseParams::resolve(
            lease.name.clone(),
            lease.namespace.clone(),
            lease.identity.clone(),
            lease.timing,
        )
        .context("[failover] election = \"kubernetes\": the Lease")?;
        let problems = params.problems();
        if !problems.is_empty() {
            bail!("[failover]: {}", problems.join("; "));
        }
        let api = crate::election::ApiServer::in_cluster().context(
            "[failover] election = \"kubernetes\" needs the in-cluster API server \
             (KUBERNETES_SERVICE_HOST and the service account token): run in a pod",
        )?;
        Ok(Some(Lease { api, params }))
    }
}

/// The running Lease election: it asks for a role on `roles` at every
/// change.
struct Election {
    task: tokio::task::JoinHandle<()>,
    stop: tokio::sync::oneshot::Sender<()>,
    deadline: Duration,
    /// The Lease's `leaseTransitions` when this replica last took it.
    term: Arc<std::sync::atomic::AtomicU64>,
}

impl Election {
    /// Starts the election. A step-down takes effect in the core at once
    /// (the margin before another replica may take over is only
    /// `lease_duration - renew_deadline`); the routes and the rendezvous
    /// follow through `roles`, as every role change does.
    fn start(lease: Lease, roles: watch::Sender<Role>, ctx: Arc<Ctx>) -> Election {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let deadline = lease.params.timing.renew_deadline + Duration::from_secs(1);
        let term = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let holder_term = Arc::clone(&term);
        let task = tokio::spawn(async move {
            let on_role = move |role: crate::election::Role| {
                let role = match role {
                    crate::election::Role::Active { term } => {
                        holder_term.store(u64::from(term), Ordering::Release);
                        Role::Active
                    }
                    crate::election::Role::Standby => {
                        ctx.site.set_role(Role::Standby, &mut ctx.io());
                        Role::Standby
                    }
                };
                roles.send_replace(role);
            };
            let shutdown = async {
                let _ = stopped.await;
            };
            if let Err(e) = crate::election::run(lease.api, lease.params, on_role, shutdown).await {
                warn!("the Lease election stopped: {e}");
            }
        });
        Election {
            task,
            stop,
            deadline,
            term,
        }
    }

    /// The Lease's term of this replica's latest activation.
    fn term(&self) -> u64 {
        self.term.load(Ordering::Acquire)
    }

    /// Gives the Lease back (when held) and waits for that, within the
    /// renew deadline.
    async fn release(self) {
        let _ = self.stop.send(());
        if tokio::time::timeout(self.deadline, self.task)
            .await
            .is_err()
        {
            warn!("the Lease was not released in time; the standby takes over when it expires");
        }
    }
}

/// Starts the endpoint for the node agents when `[cluster]` is set (not
/// active until [`announce_role`] says so).
async fn start_cluster(
    config: &Config,
    netlink: &Netlink,
) -> anyhow::Result<Option<crate::cluster::Gateway>> {
    let Some(cluster) = &config.cluster else {
        return Ok(None);
    };
    let gateway =
        crate::cluster::Gateway::start(&config.site.name, &config.site.pod_cidrs, cluster, netlink)
            .await?;
    Ok(Some(gateway))
}

/// Tells the node agents the peer view CIDRs the site routes now; at
/// start and after every reload.
fn announce_views(announcer: Option<&Announcer>, ctx: &Ctx) {
    if let Some(announcer) = announcer {
        announcer.set_views(ctx.site.peers().all_views());
    }
}

/// Tells the node agents whether this replica is the active gateway; at
/// start and after every role change. The term of an activation is the
/// wall clock in milliseconds when it happened, so that a node hearing two
/// replicas both say "active" (the old one has not noticed yet) follows
/// the one activated last; it stays the same while the replica stays
/// active.
fn announce_role(announcer: Option<&Announcer>, ctx: &Ctx, lease_term: Option<u64>) {
    let Some(announcer) = announcer else { return };
    let active = ctx.site.is_active();
    let current = announcer.current();
    if active && !current.active {
        // A Lease counts its holders (`leaseTransitions`), which needs no
        // agreement between clocks; keepalived has no such counter.
        let term = lease_term.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .max(current.term.saturating_add(1))
        });
        announcer.set_active(true, term);
    } else if !active && current.active {
        announcer.set_active(false, current.term);
    }
}

/// What NAT traversal starts from, when the site has a rendezvous or STUN
/// servers.
fn traversal_params(config: &Config, listen_port: u16) -> Option<TraversalParams> {
    let site = &config.site;
    let stun_servers: Vec<std::net::SocketAddr> = config
        .rendezvous
        .iter()
        .map(|r| r.stun.addr)
        .chain(site.stun_servers.iter().map(|s| s.addr))
        .collect();
    if config.rendezvous.is_empty() && stun_servers.is_empty() {
        return None;
    }
    // Addresses inside the pod networks are never reachable from a peer.
    let host = crate::candidates::host_candidates(listen_port, &site.interface)
        .into_iter()
        .filter(|c| !site.pod_cidrs.iter().any(|net| net.contains(&c.ip())))
        .collect();
    Some(TraversalParams::new(
        stun_servers,
        site.advertise_endpoints.clone(),
        host,
    ))
}

/// Removes our routes through the interface and the interface. Runs on every
/// exit path after the TUN exists. The backstop routes stay: until the next
/// start (or `causeway down --purge`), peer traffic is dropped, never sent
/// out by the default route in clear.
async fn teardown(netlink: &Netlink, link: &Link, ctx: &Ctx) -> anyhow::Result<()> {
    let mut result = Ok(());
    for dst in ctx.site.peers().all_views() {
        if let Err(e) = netlink.remove_route(link, dst).await {
            warn!("{e}");
            result = Err(e.into());
        }
    }
    if let Err(e) = ctx.tun.set_persistent(false) {
        warn!("making {} non-persistent: {e}", link.name);
    }
    if let Err(e) = netlink.delete_link(link).await {
        warn!("{e}");
        result = Err(e.into());
    }
    result
}

/// What [`down`] removed.
#[derive(Debug, Default)]
pub struct Down {
    /// The interface, if a stopped or crashed run had left it.
    pub interface: Option<String>,
    /// Routes of ours through that interface (they go with it).
    pub routes: Vec<ipnet::IpNet>,
    /// Backstop routes (only with `purge`).
    pub backstops: Vec<ipnet::IpNet>,
}

/// `causeway down`: removes what a stopped or crashed site left on the host
/// in this network namespace: the TUN interface `interface` and our routes
/// through it, and with `purge` every backstop route too (after which peer
/// traffic follows whatever route the host has, in clear). Refuses while a
/// daemon holds the interface (it has carrier), and never touches an
/// interface that is not a TUN.
pub async fn down(interface: &str, purge: bool) -> anyhow::Result<Down> {
    let netlink = Netlink::connect()?;
    let mut down = Down::default();
    match netlink.link_by_name(interface).await? {
        Some(link) if link.kind != "tun" => bail!(causeway_netlink::Error::NotTun {
            name: link.name,
            kind: link.kind
        }),
        Some(link) if link.carrier => bail!(
            "interface {interface} is in use (it has carrier: a daemon holds it); \
             stop that daemon first (e.g. `systemctl stop causeway`)"
        ),
        Some(link) => {
            down.routes = netlink.owned_routes(&link).await?;
            for &dst in &down.routes {
                netlink.remove_route(&link, dst).await?;
            }
            netlink.delete_link(&link).await?;
            down.interface = Some(link.name);
        }
        None => {}
    }
    if purge {
        down.backstops = netlink.reconcile_backstops(&[]).await?.removed;
    }
    Ok(down)
}
