//! Prometheus metrics and health endpoints over HTTP/1.1, for the site
//! daemon (`serve`, `causeway up`) and for the rendezvous
//! ([`serve_rendezvous`], `causeway rendezvous --metrics-listen`).
//!
//! Served only when `[site] metrics_listen` (or `--metrics-listen`) is set
//! (off by default: nothing listens unless the operator asks;
//! `127.0.0.1:9469` for a local agent, or the node's or pod's address for a
//! cluster's Prometheus and the kubelet's probes).
//!
//! | path | answer |
//! |---|---|
//! | `/metrics` | the Prometheus text format (0.0.4) |
//! | `/healthz` | 200 while the process runs and its runtime answers |
//! | `/readyz` | site: 200 once the interface, its routes and the config are in place; rendezvous: 200 once its sockets are bound and it serves, 503 again when it shuts down; 503 otherwise |
//!
//! Only `GET` and `HEAD` are accepted (405 otherwise); other paths are 404.
//!
//! Every value is read from the daemon's own state at scrape time (a
//! [`Collector`]): the data path keeps its counters as it always does and
//! pays nothing for metrics. The site's series:
//!
//! | series | type | labels |
//! |---|---|---|
//! | `causeway_build_info` | gauge (1) | `version` |
//! | `causeway_peers_configured` | gauge | |
//! | `causeway_peer_info` | gauge (1) | `peer`, `public_key` |
//! | `causeway_peer_tx_bytes_total`, `causeway_peer_rx_bytes_total` | counter | `peer` |
//! | `causeway_peer_tx_packets_total`, `causeway_peer_rx_packets_total` | counter | `peer` |
//! | `causeway_peer_last_handshake_timestamp_seconds` | gauge (0: never) | `peer` |
//! | `causeway_peer_drops_total` | counter | `peer`, `reason` |
//! | `causeway_site_drops_total` | counter | `reason` |
//! | `process_cpu_seconds_total`, `process_resident_memory_bytes`, `process_virtual_memory_bytes`, `process_open_fds`, `process_max_fds`, `process_start_time_seconds` | | |
//!
//! Bytes and packets are inner (plaintext) ones, as in `causeway status`.
//! Every drop reason is exported for every peer, zeros included, so that
//! `rate()` and alerts work from the first scrape. A handshake older than
//! three minutes means the peer is down:
//! `time() - causeway_peer_last_handshake_timestamp_seconds > 180`.
//!
//! The rendezvous' series (with `causeway_build_info` and the `process_*`
//! series as above):
//!
//! | series | type | labels |
//! |---|---|---|
//! | `causeway_rendezvous_sites_configured` | gauge | |
//! | `causeway_rendezvous_site_connected` | gauge (1: connected and authenticated, 0: not) | `site` |
//! | `causeway_rendezvous_relayed_packets_total` | counter | `site` |
//! | `causeway_rendezvous_relayed_bytes_total` | counter | `site` |
//! | `causeway_rendezvous_relay_dropped_total` | counter | `site` |
//! | `causeway_rendezvous_stun_answered_total` | counter | |
//!
//! `site` is the name in the rendezvous' `[[site]]` table; every configured
//! site is exported, connected or not. Relay counters count what the site
//! sent: WireGuard packets (once however many fragments they took) and their
//! bytes (relay headers excluded), and relay datagrams from it that were
//! dropped (not addressed to a connected mutual peer, or malformed). A site
//! that should be up: `causeway_rendezvous_site_connected == 0`.
//!
//! The `process_*` series carry the standard names of Prometheus' client
//! libraries (no `causeway_` prefix), so that existing dashboards work.

use std::convert::Infallible;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use causeway_nat::rendezvous::{ServerStats, SiteStats};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{Instrument, debug, info, warn};

use crate::datapath::Ctx;
use crate::keys;
use crate::peer::{DropReason, Drops};

/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 32;
/// A client must send its request headers within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A kept-alive connection is closed (after its current request) this long
/// after it was opened, so that idle clients cannot hold every slot.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(120);
/// Time left to a connection to finish its request once it is being closed.
const CLOSE_GRACE: Duration = Duration::from_secs(10);

const N_REASONS: usize = DropReason::ALL.len();

/// The running HTTP server; dropping it stops serving.
pub struct MetricsServer {
    task: JoinHandle<()>,
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `/metrics` for `ctx`, `/healthz` and `/readyz` (which answers 200
/// only while `ready` is true) on `addr`.
pub(crate) async fn serve(
    addr: SocketAddr,
    ctx: Arc<Ctx>,
    ready: Arc<AtomicBool>,
) -> io::Result<MetricsServer> {
    let listener = bind(addr).await?;
    serve_on(
        listener,
        registry(move || SiteSample::collect(&ctx, SystemTime::now())),
        ready,
    )
}

/// Serves `/metrics` for a rendezvous (read from `stats` at each scrape),
/// `/healthz`, and `/readyz` (200 only while `ready` is true: the caller
/// sets it once the rendezvous' sockets are bound and clears it when it
/// shuts down) on `addr`.
pub async fn serve_rendezvous(
    addr: SocketAddr,
    stats: ServerStats,
    ready: Arc<AtomicBool>,
) -> io::Result<MetricsServer> {
    let listener = bind(addr).await?;
    serve_on(
        listener,
        rendezvous_registry(move || RendezvousSample::collect(&stats)),
        ready,
    )
}

/// Binds `addr`; the error names it.
async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot listen on {addr} for metrics: {e}"),
        )
    })
}

/// Serves `registry` on a bound `listener` (tests bind port 0).
fn serve_on(
    listener: TcpListener,
    registry: Registry,
    ready: Arc<AtomicBool>,
) -> io::Result<MetricsServer> {
    let local_addr = listener.local_addr()?;
    let state = Arc::new(State { registry, ready });
    let task = tokio::spawn(
        accept_loop(listener, state).instrument(tracing::info_span!("metrics", %local_addr)),
    );
    info!(%local_addr, "serving /metrics, /healthz and /readyz");
    Ok(MetricsServer { task })
}

/// The registry: process metrics, and the site's under `causeway_`.
fn registry(sample: impl Fn() -> SiteSample + Send + Sync + 'static) -> Registry {
    registry_of(SiteCollector {
        sample: Box::new(sample),
    })
}

/// The registry of a rendezvous: process metrics, and its own under
/// `causeway_`.
fn rendezvous_registry(sample: impl Fn() -> RendezvousSample + Send + Sync + 'static) -> Registry {
    registry_of(RendezvousCollector {
        sample: Box::new(sample),
    })
}

/// Process metrics, and `collector`'s series under `causeway_`.
fn registry_of(collector: impl Collector + 'static) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ProcessCollector));
    registry
        .sub_registry_with_prefix("causeway")
        .register_collector(Box::new(collector));
    registry
}

struct State {
    registry: Registry,
    ready: Arc<AtomicBool>,
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    // Connections live in the set, so that aborting this task ends them.
    let mut connections = JoinSet::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    loop {
        while connections.try_join_next().is_some() {}
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors and the like: wait instead of spinning.
                    warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let state = Arc::clone(&state);
        let conn = builder.serve_connection(
            TokioIo::new(stream),
            service_fn(move |req: Request<Incoming>| {
                let response = respond(req.method(), req.uri().path(), &state);
                async move { Ok::<_, Infallible>(response) }
            }),
        );
        connections.spawn(
            async move {
                tokio::pin!(conn);
                let served = tokio::select! {
                    served = conn.as_mut() => served,
                    _ = tokio::time::sleep(MAX_CONNECTION_AGE) => {
                        conn.as_mut().graceful_shutdown();
                        tokio::time::timeout(CLOSE_GRACE, conn).await.unwrap_or(Ok(()))
                    }
                };
                if let Err(e) = served {
                    debug!(%peer, "connection: {e}");
                }
                drop(permit);
            }
            .in_current_span(),
        );
    }
}

/// The answer to `method path`.
fn respond(method: &Method, path: &str, state: &State) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match path {
        "/metrics" => {
            let mut body = String::with_capacity(16 << 10);
            match prometheus_client::encoding::prometheus_text::encode(&mut body, &state.registry) {
                Ok(()) => {
                    let mut response = Response::new(Full::new(Bytes::from(body)));
                    response.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static(
                            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                        ),
                    );
                    response
                }
                Err(fmt::Error) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "encoding the metrics failed\n",
                ),
            }
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if state.ready.load(Ordering::Acquire) => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz or /readyz\n",
        ),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The site's state at one scrape.
pub(crate) struct SiteSample {
    pub(crate) peers: Vec<PeerSample>,
    /// Drops not attributable to a peer, indexed like [`DropReason::ALL`].
    pub(crate) drops: [u64; N_REASONS],
}

/// One peer in a [`SiteSample`].
pub(crate) struct PeerSample {
    pub(crate) name: String,
    /// Base64, as in the config.
    pub(crate) public_key: String,
    pub(crate) tx_bytes: u64,
    pub(crate) tx_packets: u64,
    pub(crate) rx_bytes: u64,
    pub(crate) rx_packets: u64,
    /// Unix time of the last completed handshake.
    pub(crate) last_handshake: Option<f64>,
    /// Indexed like [`DropReason::ALL`].
    pub(crate) drops: [u64; N_REASONS],
}

impl SiteSample {
    /// Reads `ctx`; `now` turns handshake ages into timestamps.
    pub(crate) fn collect(ctx: &Ctx, now: SystemTime) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        let drops = |d: &Drops| DropReason::ALL.map(|r| d.get(r));
        SiteSample {
            peers: ctx
                .peers()
                .iter()
                .map(|p| {
                    let age = p.last_handshake();
                    PeerSample {
                        name: p.name().to_owned(),
                        public_key: keys::encode_public(p.public_key()),
                        tx_bytes: p.counters.tx_bytes.load(Relaxed),
                        tx_packets: p.counters.tx_packets.load(Relaxed),
                        rx_bytes: p.counters.rx_bytes.load(Relaxed),
                        rx_packets: p.counters.rx_packets.load(Relaxed),
                        last_handshake: age
                            .and_then(|age| now.checked_sub(age))
                            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                            .map(|d| d.as_secs_f64()),
                        drops: drops(&p.counters.drops),
                    }
                })
                .collect(),
            drops: drops(&ctx.drops),
        }
    }
}

/// The site's series, computed at each scrape.
struct SiteCollector {
    sample: Box<dyn Fn() -> SiteSample + Send + Sync>,
}

impl fmt::Debug for SiteCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SiteCollector")
    }
}

impl Collector for SiteCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let site = (self.sample)();
        build_info(&mut encoder)?;
        gauge(
            &mut encoder,
            "peers_configured",
            "Peers in the running config",
            site.peers.len() as i64,
        )?;

        let mut info = encoder.encode_descriptor(
            "peer_info",
            "A configured peer and its WireGuard public key",
            None,
            MetricType::Gauge,
        )?;
        for p in &site.peers {
            let labels = [
                ("peer", p.name.as_str()),
                ("public_key", p.public_key.as_str()),
            ];
            ConstGauge::new(1i64).encode(info.encode_family(&labels)?)?;
        }
        type Value = fn(&PeerSample) -> u64;
        let per_peer: [(&str, &str, Value); 4] = [
            (
                "peer_tx_bytes",
                "Bytes of inner packets sent to the peer",
                |p| p.tx_bytes,
            ),
            (
                "peer_rx_bytes",
                "Bytes of inner packets received from the peer",
                |p| p.rx_bytes,
            ),
            ("peer_tx_packets", "Inner packets sent to the peer", |p| {
                p.tx_packets
            }),
            (
                "peer_rx_packets",
                "Inner packets received from the peer and delivered",
                |p| p.rx_packets,
            ),
        ];
        for (name, help, value) in per_peer {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for p in &site.peers {
                ConstCounter::new(value(p))
                    .encode(family.encode_family(&[("peer", p.name.as_str())])?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "peer_last_handshake_timestamp_seconds",
            "Unix time of the last completed WireGuard handshake with the peer (0: none yet)",
            None,
            MetricType::Gauge,
        )?;
        for p in &site.peers {
            ConstGauge::new(p.last_handshake.unwrap_or(0.0))
                .encode(family.encode_family(&[("peer", p.name.as_str())])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "peer_drops",
            "Packets to or from the peer that were dropped, by reason",
            None,
            MetricType::Counter,
        )?;
        for p in &site.peers {
            for (reason, n) in DropReason::ALL.iter().zip(p.drops) {
                let labels = [("peer", p.name.as_str()), ("reason", reason.name())];
                ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "site_drops",
            "Packets dropped before a peer was known (not WireGuard, unknown key, no route), by reason",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in DropReason::ALL.iter().zip(site.drops) {
            ConstCounter::new(n).encode(family.encode_family(&[("reason", reason.name())])?)?;
        }
        Ok(())
    }
}

/// `causeway_build_info{version}` (the prefix comes from the registry).
fn build_info(encoder: &mut DescriptorEncoder<'_>) -> fmt::Result {
    let build = Info::new([("version", env!("CARGO_PKG_VERSION"))]);
    build.encode(encoder.encode_descriptor(
        "build",
        "Causeway's version",
        None,
        build.metric_type(),
    )?)
}

/// A rendezvous' state at one scrape.
struct RendezvousSample {
    /// Every configured site, sorted by name.
    sites: Vec<SiteStats>,
    /// STUN Binding requests answered.
    stun_answered: u64,
}

impl RendezvousSample {
    fn collect(stats: &ServerStats) -> Self {
        RendezvousSample {
            sites: stats.sites(),
            stun_answered: stats.stun_answered(),
        }
    }
}

/// The rendezvous' series, computed at each scrape.
struct RendezvousCollector {
    sample: Box<dyn Fn() -> RendezvousSample + Send + Sync>,
}

impl fmt::Debug for RendezvousCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RendezvousCollector")
    }
}

impl Collector for RendezvousCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let rendezvous = (self.sample)();
        build_info(&mut encoder)?;
        gauge(
            &mut encoder,
            "rendezvous_sites_configured",
            "Sites in the rendezvous' config",
            rendezvous.sites.len() as i64,
        )?;
        let mut family = encoder.encode_descriptor(
            "rendezvous_site_connected",
            "Whether the site is connected and authenticated now (1) or not (0)",
            None,
            MetricType::Gauge,
        )?;
        for s in &rendezvous.sites {
            ConstGauge::new(i64::from(s.connected))
                .encode(family.encode_family(&[("site", s.name.as_str())])?)?;
        }
        type Value = fn(&SiteStats) -> u64;
        let per_site: [(&str, &str, Value); 3] = [
            (
                "rendezvous_relayed_packets",
                "WireGuard packets relayed from the site (once however many fragments they took)",
                |s| s.relayed_packets,
            ),
            (
                "rendezvous_relayed_bytes",
                "Bytes of WireGuard packets relayed from the site (relay headers excluded)",
                |s| s.relayed_bytes,
            ),
            (
                "rendezvous_relay_dropped",
                "Relay datagrams from the site that were dropped (no connected mutual peer, or malformed)",
                |s| s.relay_dropped,
            ),
        ];
        for (name, help, value) in per_site {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for s in &rendezvous.sites {
                ConstCounter::new(value(s))
                    .encode(family.encode_family(&[("site", s.name.as_str())])?)?;
            }
        }
        let stun = ConstCounter::new(rendezvous.stun_answered);
        stun.encode(encoder.encode_descriptor(
            "rendezvous_stun_answered",
            "STUN Binding requests answered",
            None,
            stun.metric_type(),
        )?)?;
        Ok(())
    }
}

fn gauge<N: prometheus_client::encoding::EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: N,
) -> fmt::Result {
    let gauge = ConstGauge::new(value);
    gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
}

/// The standard `process_*` series, from `/proc/self`.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let Some(p) = ProcessSample::read() else {
            return Ok(());
        };
        let cpu = ConstCounter::new(p.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            cpu.metric_type(),
        )?)?;
        gauge(
            &mut encoder,
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            p.resident_bytes,
        )?;
        gauge(
            &mut encoder,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
            p.virtual_bytes,
        )?;
        if let Some(start) = p.start_time {
            gauge(
                &mut encoder,
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                start,
            )?;
        }
        if let Some(fds) = p.open_fds {
            gauge(
                &mut encoder,
                "process_open_fds",
                "Number of open file descriptors",
                fds,
            )?;
        }
        if let Some(max) = p.max_fds {
            gauge(
                &mut encoder,
                "process_max_fds",
                "Maximum number of open file descriptors",
                max,
            )?;
        }
        Ok(())
    }
}

/// What `/proc` says about this process.
#[derive(Debug, PartialEq)]
struct ProcessSample {
    cpu_seconds: f64,
    resident_bytes: u64,
    virtual_bytes: u64,
    start_time: Option<f64>,
    open_fds: Option<u64>,
    max_fds: Option<u64>,
}

/// The fields of `/proc/<pid>/stat` that the metrics use.
#[derive(Debug, PartialEq, Eq)]
struct Stat {
    /// utime + stime, in clock ticks.
    cpu_ticks: u64,
    /// Clock ticks after boot.
    start_ticks: u64,
    virtual_bytes: u64,
    resident_pages: u64,
}

impl ProcessSample {
    fn read() -> Option<Self> {
        let stat = parse_stat(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
        // SAFETY: sysconf only reads configuration values.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
        let page = if page > 0 { page as u64 } else { 4096 };
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| parse_boot_time(&s));
        Some(ProcessSample {
            cpu_seconds: stat.cpu_ticks as f64 / ticks,
            resident_bytes: stat.resident_pages * page,
            virtual_bytes: stat.virtual_bytes,
            start_time: boot.map(|boot| boot as f64 + stat.start_ticks as f64 / ticks),
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|dir| dir.count() as u64),
            max_fds: std::fs::read_to_string("/proc/self/limits")
                .ok()
                .and_then(|s| parse_max_fds(&s)),
        })
    }
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) may contain
/// spaces and parentheses, so fields are counted from its last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    // rest[0] is field 3 (state).
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        cpu_ticks: field(14)?.checked_add(field(15)?)?,
        start_ticks: field(22)?,
        virtual_bytes: field(23)?,
        resident_pages: field(24)?,
    })
}

/// `btime` of `/proc/stat`: boot time, Unix seconds.
fn parse_boot_time(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// The soft "Max open files" limit of `/proc/<pid>/limits`.
fn parse_max_fds(text: &str) -> Option<u64> {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?;
    line.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn sample() -> SiteSample {
        let mut b_drops = [0; N_REASONS];
        b_drops[DropReason::SpoofedSource as usize] = 5;
        b_drops[DropReason::PolicyPort as usize] = 2;
        let mut site_drops = [0; N_REASONS];
        site_drops[DropReason::Malformed as usize] = 400;
        SiteSample {
            peers: vec![
                PeerSample {
                    name: "b".into(),
                    public_key: "YmJi".into(),
                    tx_bytes: 1000,
                    tx_packets: 10,
                    rx_bytes: 2000,
                    rx_packets: 20,
                    last_handshake: Some(1_700_000_000.5),
                    drops: b_drops,
                },
                PeerSample {
                    name: "c-\"quoted\"".into(),
                    public_key: "Y2Nj".into(),
                    tx_bytes: 0,
                    tx_packets: 0,
                    rx_bytes: 0,
                    rx_packets: 0,
                    last_handshake: None,
                    drops: [0; N_REASONS],
                },
            ],
            drops: site_drops,
        }
    }

    /// Parses the text format into `series{labels} → value`, checking that
    /// every sample follows its `# HELP` and `# TYPE` lines.
    fn parse(text: &str) -> BTreeMap<String, f64> {
        let mut series = BTreeMap::new();
        let mut typed = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
                assert!(["counter", "gauge"].contains(&kind), "{line}");
                typed = name.to_owned();
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let (key, value) = line.rsplit_once(' ').expect("sample");
            let name = key.split('{').next().expect("name");
            assert_eq!(name, typed, "sample without its TYPE line: {line}");
            assert!(
                series
                    .insert(key.to_owned(), value.parse().expect("value"))
                    .is_none(),
                "duplicate {key}"
            );
        }
        series
    }

    fn encode(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, registry).expect("encode");
        text
    }

    #[test]
    fn exposition_has_every_series() {
        let text = encode(&registry(sample));
        let series = parse(&text);
        let get = |key: &str| {
            *series
                .get(key)
                .unwrap_or_else(|| panic!("no {key} in\n{text}"))
        };
        assert_eq!(
            get(&format!(
                "causeway_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )),
            1.0
        );
        assert_eq!(get("causeway_peers_configured"), 2.0);
        assert_eq!(
            get("causeway_peer_info{peer=\"b\",public_key=\"YmJi\"}"),
            1.0
        );
        assert_eq!(get("causeway_peer_tx_bytes_total{peer=\"b\"}"), 1000.0);
        assert_eq!(get("causeway_peer_rx_bytes_total{peer=\"b\"}"), 2000.0);
        assert_eq!(get("causeway_peer_tx_packets_total{peer=\"b\"}"), 10.0);
        assert_eq!(get("causeway_peer_rx_packets_total{peer=\"b\"}"), 20.0);
        assert_eq!(
            get("causeway_peer_last_handshake_timestamp_seconds{peer=\"b\"}"),
            1_700_000_000.5
        );
        assert_eq!(
            get("causeway_peer_last_handshake_timestamp_seconds{peer=\"c-\\\"quoted\\\"\"}"),
            0.0
        );
        assert_eq!(
            get("causeway_peer_drops_total{peer=\"b\",reason=\"spoofed_source\"}"),
            5.0
        );
        assert_eq!(
            get("causeway_peer_drops_total{peer=\"b\",reason=\"policy_port\"}"),
            2.0
        );
        assert_eq!(
            get("causeway_site_drops_total{reason=\"malformed\"}"),
            400.0
        );
        // Every reason, for every peer and the site, zeros included.
        for reason in DropReason::ALL {
            for peer in ["b", "c-\\\"quoted\\\""] {
                get(&format!(
                    "causeway_peer_drops_total{{peer=\"{peer}\",reason=\"{}\"}}",
                    reason.name()
                ));
            }
            get(&format!(
                "causeway_site_drops_total{{reason=\"{}\"}}",
                reason.name()
            ));
        }
        assert!(
            text.contains("# TYPE causeway_peer_rx_bytes_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE causeway_peer_last_handshake_timestamp_seconds gauge\n"),
            "{text}"
        );
        // This process' own series.
        assert!(get("process_cpu_seconds_total") >= 0.0);
        assert!(get("process_resident_memory_bytes") > 1e5);
        assert!(get("process_virtual_memory_bytes") >= get("process_resident_memory_bytes"));
        assert!(get("process_open_fds") >= 3.0);
        assert!(get("process_max_fds") >= get("process_open_fds"));
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        let start = get("process_start_time_seconds");
        assert!(
            start <= now + 1.0 && start > now - 24.0 * 3600.0,
            "start {start}, now {now}"
        );
    }

    #[test]
    fn no_peers_still_exports_the_site() {
        let text = encode(&registry(|| SiteSample {
            peers: vec![],
            drops: [0; N_REASONS],
        }));
        let series = parse(&text);
        assert_eq!(series.get("causeway_peers_configured"), Some(&0.0));
        assert_eq!(
            series
                .keys()
                .filter(|k| k.starts_with("causeway_site_drops_total"))
                .count(),
            N_REASONS
        );
        assert!(
            !series.keys().any(|k| k.starts_with("causeway_peer_")),
            "{text}"
        );
    }

    #[test]
    fn proc_parsers() {
        // A command name with spaces and parentheses.
        let stat = "4242 (cw (x) y) S 1 4242 4242 0 -1 4194560 900 0 0 0 150 37 0 0 20 0 4 0 123456 \
                    987654321 2500 18446744073709551615 1 1 0 0 0 0 0 4096 17475 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(
            parse_stat(stat),
            Some(Stat {
                cpu_ticks: 187,
                start_ticks: 123456,
                virtual_bytes: 987654321,
                resident_pages: 2500
            })
        );
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 1 2"), None);
        assert_eq!(
            parse_boot_time("cpu  1 2 3\nbtime 1700000000\nprocesses 5\n"),
            Some(1_700_000_000)
        );
        assert_eq!(parse_boot_time("cpu 1\n"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             95528                95528                processes \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(parse_max_fds(limits), Some(1024));
        assert_eq!(
            parse_max_fds(
                "Max open files            unlimited            unlimited            files\n"
            ),
            None
        );
        let own = ProcessSample::read().expect("/proc/self");
        assert!(
            own.resident_bytes > 0 && own.open_fds.is_some() && own.max_fds.is_some(),
            "{own:?}"
        );
    }

    /// One HTTP/1.1 exchange; returns the status code, the headers (lower
    /// case) and the body.
    async fn http(addr: SocketAddr, request: &str) -> (u16, String, String) {
        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        conn.write_all(request.as_bytes()).await.expect("send");
        let mut raw = Vec::new();
        conn.read_to_end(&mut raw).await.expect("read");
        let raw = String::from_utf8(raw).expect("utf-8");
        let (head, body) = raw.split_once("\r\n\r\n").expect("head and body");
        let status = head
            .split(' ')
            .nth(1)
            .expect("status")
            .parse()
            .expect("code");
        (status, head.to_ascii_lowercase(), body.to_owned())
    }

    fn get(path: &str) -> String {
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    }

    #[tokio::test]
    async fn endpoints() {
        let ready = Arc::new(AtomicBool::new(false));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = serve_on(listener, registry(sample), Arc::clone(&ready)).expect("serve");

        let (status, head, body) = http(addr, &get("/metrics")).await;
        assert_eq!(status, 200, "{head}");
        assert!(
            head.contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
            "{head}"
        );
        assert_eq!(
            parse(&body).get("causeway_peer_rx_bytes_total{peer=\"b\"}"),
            Some(&2000.0)
        );

        assert_eq!(http(addr, &get("/healthz")).await.0, 200);
        assert_eq!(http(addr, &get("/readyz")).await.0, 503);
        ready.store(true, Ordering::Release);
        assert_eq!(http(addr, &get("/readyz")).await.0, 200);
        assert_eq!(http(addr, &get("/metrics?x=1")).await.0, 200);
        assert_eq!(http(addr, &get("/nope")).await.0, 404);

        let (status, head, body) = http(
            addr,
            "HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!((status, body.as_str()), (200, ""), "{head}");
        let (status, head, _) = http(
            addr,
            "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(status, 405);
        assert!(head.contains("allow: get, head"), "{head}");

        // Keep-alive: several requests on one connection.
        let pipelined = format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /metrics HTTP/1.1\r\nHost: x\r\n\r\n{}",
            get("/readyz")
        );
        let (status, _, rest) = http(addr, &pipelined).await;
        assert_eq!(status, 200);
        assert_eq!(rest.matches("HTTP/1.1 200 OK").count(), 2, "{rest}");

        // Garbage gets a 400 or a closed connection, and the server goes on.
        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        conn.write_all(b"\x00\x01\x02 not http at all\r\n\r\n")
            .await
            .expect("send");
        let mut out = Vec::new();
        let _ = conn.read_to_end(&mut out).await;
        assert!(
            out.is_empty() || out.starts_with(b"HTTP/1.1 400"),
            "{}",
            String::from_utf8_lossy(&out)
        );
        assert_eq!(http(addr, &get("/healthz")).await.0, 200);

        // Dropping the server closes the port.
        drop(server);
        tokio::task::yield_now().await;
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "still listening after drop"
        );
    }

    fn rendezvous_sample() -> RendezvousSample {
        let key = |b: u8| x25519_dalek::PublicKey::from([b; 32]);
        RendezvousSample {
            sites: vec![
                SiteStats {
                    name: "a".into(),
                    public_key: key(1),
                    connected: true,
                    relayed_packets: 30,
                    relayed_bytes: 4500,
                    relay_dropped: 2,
                },
                SiteStats {
                    name: "b".into(),
                    public_key: key(2),
                    connected: false,
                    relayed_packets: 0,
                    relayed_bytes: 0,
                    relay_dropped: 0,
                },
            ],
            stun_answered: 17,
        }
    }

    #[test]
    fn rendezvous_exposition_has_every_series() {
        let text = encode(&rendezvous_registry(rendezvous_sample));
        let series = parse(&text);
        let get = |key: &str| {
            *series
                .get(key)
                .unwrap_or_else(|| panic!("no {key} in\n{text}"))
        };
        assert_eq!(
            get(&format!(
                "causeway_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )),
            1.0
        );
        assert_eq!(get("causeway_rendezvous_sites_configured"), 2.0);
        assert_eq!(get("causeway_rendezvous_site_connected{site=\"a\"}"), 1.0);
        assert_eq!(get("causeway_rendezvous_site_connected{site=\"b\"}"), 0.0);
        assert_eq!(
            get("causeway_rendezvous_relayed_packets_total{site=\"a\"}"),
            30.0
        );
        assert_eq!(
            get("causeway_rendezvous_relayed_bytes_total{site=\"a\"}"),
            4500.0
        );
        assert_eq!(
            get("causeway_rendezvous_relay_dropped_total{site=\"a\"}"),
            2.0
        );
        // Sites that never connected are exported too, zeros included.
        assert_eq!(
            get("causeway_rendezvous_relayed_packets_total{site=\"b\"}"),
            0.0
        );
        assert_eq!(
            get("causeway_rendezvous_relayed_bytes_total{site=\"b\"}"),
            0.0
        );
        assert_eq!(
            get("causeway_rendezvous_relay_dropped_total{site=\"b\"}"),
            0.0
        );
        assert_eq!(get("causeway_rendezvous_stun_answered_total"), 17.0);
        for (name, kind) in [
            ("causeway_rendezvous_sites_configured", "gauge"),
            ("causeway_rendezvous_site_connected", "gauge"),
            ("causeway_rendezvous_relayed_packets_total", "counter"),
            ("causeway_rendezvous_relayed_bytes_total", "counter"),
            ("causeway_rendezvous_relay_dropped_total", "counter"),
            ("causeway_rendezvous_stun_answered_total", "counter"),
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "{name} is not a {kind}:\n{text}"
            );
        }
        assert!(get("process_resident_memory_bytes") > 0.0);
        assert!(get("process_open_fds") >= 1.0);
        // Nothing of the site daemon's.
        assert!(
            !series
                .keys()
                .any(|k| k.starts_with("causeway_peer") || k.starts_with("causeway_site_")),
            "{text}"
        );
        // Exactly the documented causeway_ series.
        let names: std::collections::BTreeSet<&str> = series
            .keys()
            .filter(|k| k.starts_with("causeway_"))
            .filter_map(|k| k.split('{').next())
            .collect();
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            [
                "causeway_build_info",
                "causeway_rendezvous_relay_dropped_total",
                "causeway_rendezvous_relayed_bytes_total",
                "causeway_rendezvous_relayed_packets_total",
                "causeway_rendezvous_site_connected",
                "causeway_rendezvous_sites_configured",
                "causeway_rendezvous_stun_answered_total",
            ]
        );
    }

    #[test]
    fn rendezvous_without_sites() {
        let text = encode(&rendezvous_registry(|| RendezvousSample {
            sites: vec![],
            stun_answered: 0,
        }));
        let series = parse(&text);
        assert_eq!(
            series.get("causeway_rendezvous_sites_configured"),
            Some(&0.0)
        );
        assert_eq!(
            series.get("causeway_rendezvous_stun_answered_total"),
            Some(&0.0)
        );
        assert!(!series.keys().any(|k| k.contains("{site=")), "{text}");
    }

    /// A real (running) rendezvous' counters, read through its stats handle.
    #[tokio::test]
    async fn rendezvous_endpoints_read_the_running_server() {
        use causeway_nat::rendezvous::{RendezvousServer, SiteEntry};
        use causeway_nat::stun;
        let sites: Vec<SiteEntry> = ["east", "west"]
            .into_iter()
            .map(|name| SiteEntry {
                name: name.into(),
                public_key: x25519_dalek::PublicKey::from(&keys::generate()),
            })
            .collect();
        let quic = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind quic");
        let stun_socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind stun");
        let server =
            RendezvousServer::with_sockets(keys::generate(), &sites, quic, Some(stun_socket));
        let stun_addr = server.stun_addr().expect("stun addr");
        let stats = server.stats();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));

        let ready = Arc::new(AtomicBool::new(false));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let metrics = serve_on(
            listener,
            rendezvous_registry(move || RendezvousSample::collect(&stats)),
            Arc::clone(&ready),
        )
        .expect("serve");
        assert_eq!(http(addr, &get("/healthz")).await.0, 200);
        assert_eq!(http(addr, &get("/readyz")).await.0, 503);
        ready.store(true, Ordering::Release);
        assert_eq!(http(addr, &get("/readyz")).await.0, 200);

        // One STUN Binding request, answered.
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind client");
        let mut request = [0u8; stun::BINDING_REQUEST_LEN];
        let len = stun::encode_binding_request(&stun::TransactionId([7; 12]), &mut request);
        client
            .send_to(&request[..len], stun_addr)
            .await
            .expect("send STUN");
        let mut answer = [0u8; 512];
        tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut answer))
            .await
            .expect("STUN answer in time")
            .expect("STUN answer");

        let (status, _, body) = http(addr, &get("/metrics")).await;
        assert_eq!(status, 200);
        let series = parse(&body);
        assert_eq!(
            series.get("causeway_rendezvous_sites_configured"),
            Some(&2.0),
            "{body}"
        );
        assert_eq!(
            series.get("causeway_rendezvous_site_connected{site=\"east\"}"),
            Some(&0.0),
            "{body}"
        );
        assert_eq!(
            series.get("causeway_rendezvous_relayed_packets_total{site=\"west\"}"),
            Some(&0.0),
            "{body}"
        );
        assert_eq!(
            series.get("causeway_rendezvous_stun_answered_total"),
            Some(&1.0),
            "{body}"
        );

        let _ = stop.send(());
        running.await.expect("join").expect("rendezvous ran");
        drop(metrics);
    }

    #[tokio::test]
    async fn bind_errors_name_the_address() {
        let taken = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = taken.local_addr().expect("addr");
        let err = bind(addr).await.expect_err("port in use");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }
}
